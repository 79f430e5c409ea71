"""Request bodies of the native server: reading them safely, OpenAI-style errors, field checks.

Everything a client sends is checked here or in `idlm.requests` (the sampling rules shared with the engine and
the CLI) before it reaches the tokenizer or the engine, so hostile input gets a 4xx whose ``param`` names the field:
a body over the size limit (413), text that is not JSON, nesting deeper than `idlm.jsonsafe.MAX_DEPTH`, integer
literals of thousands of digits, lone UTF-16 surrogates, non-finite or out-of-range numbers (400).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from idlm.jsonsafe import JSONInputError, format_path, loads
from idlm.requests import InvalidRequest, clip

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512  # the text tracker compares each stop string's prefixes against the output tail at every step
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024  # a 128k-token prompt as text or token ids fits


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def checked(check, value: Any, field: str, **kwargs) -> Any:
    """Run one of `idlm.requests`' checks on a request field; its InvalidRequest becomes a 400 naming the field."""
    try:
        return check(value, name=f"'{field}'", param=field, **kwargs)
    except InvalidRequest as exc:
        raise bad(exc.message, param=exc.param) from None


def validation_message(err: dict) -> tuple[str, str | None]:
    """(message, param) of one pydantic error."""
    loc = [p for p in err.get("loc", ()) if p != "body"] if err.get("loc") else []
    param = format_path(loc) or None
    etype = err.get("type", "")
    if etype == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if etype == "missing":
        return f"'{param}' is required", param
    msg = err.get("msg", "invalid value")
    got = err.get("input")
    scalar = isinstance(got, str | int | float | bool) or got is None
    shown = clip(json.dumps(got)) if scalar else type(got).__name__
    return (f"'{param}': {msg} (got {shown})" if param else f"{msg} (got {shown})"), param


# ---------------------------------------------------------------------------------------------- request bodies
class CommonRequest(BaseModel):
    """Fields shared by chat and text completions. Strict types: a string is not a number."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension; -1 or 0 = off
    seed: int | None = None
    stop: Any = None  # string or list of strings, checked by hand for a clearer message
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    ignore_eos: bool = False  # extension (as in vLLM)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None


class ChatCompletionRequest(CommonRequest):
    messages: list[Any]
    tools: Any = None
    top_logprobs: int | None = None


class CompletionRequest(CommonRequest):
    prompt: Any
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


async def read_raw_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes (header or bytes received)."""
    too_big = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                            "(idlm serve --max-request-bytes)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body(request: Request, model: type[BaseModel], limit: int = DEFAULT_MAX_REQUEST_BYTES) -> Any:
    raw = await read_raw_body(request, limit)
    if not raw.strip():
        raise bad("the request body is empty; expected a JSON object")
    try:
        data = loads(raw)
    except JSONInputError as exc:
        if exc.kind in ("syntax", "encoding"):
            raise bad(f"request body is not valid JSON: {exc.message}", code="invalid_json") from None
        raise bad(f"invalid request body: {exc.message}", param=format_path(exc.path) or None) from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors()[0])
        raise bad(message, param=param) from None


def stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", param="stop")
    if len(items) > MAX_STOP_STRINGS:
        raise bad(f"'stop' has {len(items)} strings; at most {MAX_STOP_STRINGS} are supported", param="stop")
    if any(not s for s in items):
        raise bad("'stop' strings must not be empty", param="stop")
    for i, s in enumerate(items):
        if len(s) > MAX_STOP_CHARS:
            where = "stop" if isinstance(stop, str) else f"stop[{i}]"
            raise bad(f"'{where}' is {len(s)} characters long; at most {MAX_STOP_CHARS} are supported", param=where)
    return list(items)
