"""`idlm serve`: an OpenAI-compatible HTTP server over the reference ISD engine.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(streaming as server-sent events, or one JSON response). Requests from concurrent clients are batched into
the same engine steps by an ``EngineRunner`` (inference/runner.py) that owns the engine on one thread.

Besides the OpenAI fields the server reads ``top_k`` and ``ignore_eos``, and adds to each response an ``idlm``
object: ``tpf`` (tokens per forward), ``forwards`` and ``acceptance`` (the engine's per-position acceptance).
Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``; request bodies are read and checked
by inference/server_schema.py (size limit, safe JSON, field rules), so bad input gets a 4xx naming the field;
streaming (text pieces with stop strings held back, SSE framing, client disconnects) is inference/server_stream.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from idlm.chat import ChatTemplateError, encode_messages, stop_token_ids
from idlm.errors import UserError
from idlm.isd import check_draft_mode, max_step_rows
from idlm.requests import DEFAULT_DRAFT_MODE, check_seed, check_temperature, check_top_k, check_top_p, show

from .runner import EngineFailure, EngineRunner, RequestRejected, RequestStream
from .server_schema import (
    CHAT_ROLES,
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    ChatCompletionRequest,
    CommonRequest,
    CompletionRequest,
    checked,
    error_body,
    read_body,
    stop_strings,
    validation_message,
)
from .server_schema import bad as _bad
from .server_stream import SSE_DONE, SSE_HEADERS, ClientGone, TextTracker, sse_event, unless_disconnected

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)


# ---------------------------------------------------------------------------------------------- the app
class _Server:
    def __init__(self, runner: EngineRunner, model_name: str, draft_mode: str = DEFAULT_DRAFT_MODE["native"]):
        check_draft_mode(draft_mode)
        self.runner = runner
        self.model_name = model_name
        self.draft_mode = draft_mode  # how sampled requests draft (idlm.isd; both modes exact)
        self.tokenizer = runner.tokenizer
        self.created = int(time.time())
        model = getattr(runner.engine, "model", None)
        gen = getattr(model, "generation_config", None)
        self.eos_ids = stop_token_ids(self.tokenizer, model)
        self.defaults = {k: getattr(gen, k, None) for k in ("temperature", "top_p", "top_k")}
        config = getattr(model, "config", None)
        vocab = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
        self.vocab_size = int(vocab or len(self.tokenizer))
        self.slack = _context_slack(runner.engine)

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, messages: list[Any]) -> list[int]:
        if not messages:
            raise _bad("'messages' must contain at least one message", param="messages")
        clean = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _bad(f"'{where}' must be an object with 'role' and 'content'", param=where)
            role = m.get("role")
            if role is None:
                raise _bad(f"'{where}.role' is required", param=f"{where}.role")
            if not isinstance(role, str) or role not in CHAT_ROLES:
                got = show(role) if isinstance(role, str) else f"a JSON {type(role).__name__}"
                raise _bad(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}; got {got}",
                           param=f"{where}.role")
            content = m.get("content")
            if content is None:
                raise _bad(f"'{where}.content' is required", param=f"{where}.content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    is_text = isinstance(part, dict) and part.get("type") == "text"
                    if not (is_text and isinstance(part.get("text"), str)):
                        raise _bad(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                                   "other content is not supported", param=f"{where}.content[{j}]")
                    parts.append(part["text"])
                content = "".join(parts)
            elif not isinstance(content, str):
                raise _bad(f"'{where}.content' must be a string or a list of text parts, "
                           f"got {type(content).__name__}", param=f"{where}.content")
            clean.append({"role": role, "content": content})
        try:
            return encode_messages(self.tokenizer, clean)
        except ChatTemplateError as exc:
            raise _bad(f"the chat template rejected 'messages': {exc}", param="messages") from None

    def completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("'prompt' is empty", param="prompt")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            for i, t in enumerate(prompt):
                if not 0 <= t < self.vocab_size:
                    raise _bad(f"'prompt[{i}]': token id {show(t)} is outside the vocabulary "
                               f"(0..{self.vocab_size - 1})", param=f"prompt[{i}]")
            return list(prompt)
        if isinstance(prompt, list) and not prompt:
            raise _bad("'prompt' is empty", param="prompt")
        if isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt):
            raise _bad(f"'prompt' holds {len(prompt)} prompts; only one prompt per request is supported",
                       param="prompt")
        raise _bad("'prompt' must be a string or a list of token ids", param="prompt")

    # ------------------------------------------------------------------ sampling
    def sampling(self, req: CommonRequest, prompt_len: int, prompt_param: str, default_max: int | None):
        from .engine import SamplingParams

        if req.n != 1:
            raise _bad(f"'n' must be 1 (one completion per request is supported), got {show(req.n)}", param="n")
        best_of = getattr(req, "best_of", None)
        if best_of not in (None, 1):
            raise _bad(f"'best_of' must be 1, got {show(best_of)}", param="best_of")
        if req.logprobs not in (None, False, 0):
            raise _bad("'logprobs' is not supported by this server", param="logprobs")
        if getattr(req, "echo", False):
            raise _bad("'echo' is not supported by this server", param="echo")
        if getattr(req, "suffix", None):
            raise _bad("'suffix' is not supported by this server", param="suffix")
        if getattr(req, "tools", None):
            raise _bad("'tools' is not supported by this server", param="tools")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise _bad(f"'{name}' is not supported by this server (only 0)", param=name)
        ctx, slack = self.runner.max_context, self.slack
        room = ctx - slack - prompt_len  # new tokens that still fit
        if room < 1:
            reserved = f", {slack} of them reserved for the ISD step rows" if slack else ""
            raise _bad(f"the prompt is {prompt_len} tokens long, but the model's context ({ctx} positions{reserved}) "
                       f"takes at most {ctx - slack - 1} prompt tokens", param=prompt_param,
                       code="context_length_exceeded")
        field, max_tokens = "max_tokens", req.max_tokens
        if req.max_completion_tokens is not None:
            field, max_tokens = "max_completion_tokens", req.max_completion_tokens
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif max_tokens < 1:
            raise _bad(f"'{field}' must be at least 1, got {show(max_tokens)}", param=field)
        elif max_tokens > room:
            reserved = f", {slack} of them reserved for the ISD step rows" if slack else ""
            raise _bad(f"'{field}' is {show(max_tokens)}, but with the prompt's {prompt_len} tokens only {room} new "
                       f"tokens fit in the model's context ({ctx} positions{reserved})", param=field,
                       code="context_length_exceeded")
        # the shared sampling rules (idlm.requests), with the model's generation_config as defaults
        temperature = checked(check_temperature, _pick(req.temperature, self.defaults["temperature"], 1.0),
                              "temperature")
        top_p = checked(check_top_p, _pick(req.top_p, self.defaults["top_p"], 1.0), "top_p")
        top_k = checked(check_top_k, _pick(req.top_k, self.defaults["top_k"], 0), "top_k", minus_one_is_off=True)
        seed = checked(check_seed, req.seed, "seed")
        stop = stop_strings(req.stop)
        params = SamplingParams(
            max_new_tokens=int(max_tokens),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=() if req.ignore_eos else self.eos_ids,
            seed=seed,
            draft_mode=self.draft_mode,
        )
        return params, stop

    # ------------------------------------------------------------------ running one request
    async def submit(self, prompt_ids: list[int], params: Any, request_id: str) -> RequestStream:
        try:
            return await self.runner.submit(prompt_ids, params, request_id=request_id)
        except RequestRejected as exc:
            raise _bad(str(exc)) from None
        except EngineFailure as exc:
            raise APIError(500, str(exc), code="engine_error") from None

    async def events(self, stream: RequestStream, stop: list[str]) -> AsyncIterator[tuple[str, str | None, Any]]:
        """(new text, finish reason or None, latest RequestOutput); aborts the request when left early."""
        tracker = TextTracker(self.tokenizer, stop)
        try:
            async for out in stream:
                delta, hit = tracker.update(out.token_ids, final=out.finished)
                if hit:
                    stream.abort()
                    yield delta, "stop", out
                    return
                if out.finished:
                    yield delta, out.finish_reason or "stop", out
                    return
                if delta:
                    yield delta, None, out
        finally:
            stream.abort()  # no-op when it finished; frees the batch slot when the client went away

    async def collect(self, stream: RequestStream, stop: list[str]) -> tuple[str, str, Any]:
        """The whole completion: (text, finish reason, last RequestOutput)."""
        text, reason, last = [], "stop", None
        async for delta, fin, out in self.events(stream, stop):
            text.append(delta)
            last = out
            if fin is not None:
                reason = fin
        return "".join(text), reason, last

    async def respond(self, request: Request, req: CommonRequest, prompt_ids: list[int], params: Any,
                      stop: list[str], chat: bool) -> Any:
        """Run one validated request: an SSE stream or one OpenAI response object.

        Until the response starts, a client that disconnects (while its request waits for a batch slot or is
        decoded) has its request aborted; once an SSE stream runs, Starlette cancels it on disconnect.
        """
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name}
        try:
            stream = await unless_disconnected(request, self.submit(prompt_ids, params, rid))
        except ClientGone:
            return Response(status_code=499)
        if not req.stream:
            try:
                text, reason, last = await unless_disconnected(request, self.collect(stream, stop))
            except ClientGone:
                stream.abort()
                return Response(status_code=499)
            except EngineFailure as exc:
                raise APIError(500, str(exc), code="engine_error") from None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            return {**base, "choices": [{**choice, "logprobs": None, "finish_reason": reason}],
                    "usage": self.usage(len(prompt_ids), last), "idlm": _idlm_stats(last)}

        events = self.events(stream, stop)
        try:  # wait for the first output so that an engine failure can still answer 500
            first = await unless_disconnected(request, events.__anext__())
        except ClientGone:
            stream.abort()
            return Response(status_code=499)
        except EngineFailure as exc:
            raise APIError(500, str(exc), code="engine_error") from None
        except BaseException:
            stream.abort()
            raise
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        if chat:
            base["object"] = "chat.completion.chunk"

        def chunk(text: str | None, finish: str | None, **extra) -> str:
            if chat:
                delta = {} if text is None else ({"content": text} if text != "" else {"role": "assistant",
                                                                                       "content": ""})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return sse_event({**base, "choices": [{**choice, "logprobs": None, "finish_reason": finish}], **extra})

        async def sse() -> AsyncIterator[str]:
            last = None
            try:
                if chat:
                    yield chunk("", None)
                item = first
                while item is not None:
                    delta, fin, last = item
                    if delta:
                        yield chunk(delta, None)
                    if fin is not None:
                        yield chunk(None, fin, idlm=_idlm_stats(last))
                        break
                    item = await anext(events, None)
            except EngineFailure as exc:
                yield sse_event(error_body(str(exc), "server_error", code="engine_error"))
            finally:
                stream.abort()  # no-op after the end; frees the batch slot when the client went away
                await events.aclose()
            if include_usage:
                yield sse_event({**base, "choices": [], "usage": self.usage(len(prompt_ids), last),
                            "idlm": _idlm_stats(last)})
            yield SSE_DONE

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)

    def usage(self, prompt_len: int, out: Any) -> dict:
        completion = len(out.token_ids) if out is not None else 0
        return {"prompt_tokens": prompt_len, "completion_tokens": completion, "total_tokens": prompt_len + completion}


def _idlm_stats(out: Any) -> dict:
    if out is None:
        return {"tpf": 0.0, "forwards": 0, "acceptance": []}
    return {"tpf": float(out.tpf), "forwards": int(out.forwards), "acceptance": [float(a) for a in out.acceptance]}


def _context_slack(engine: Any) -> int:
    """Positions the engine needs beyond prompt + new tokens: a step writes up to 2N - 1 rows past the committed
    tokens (see ISDEngine.add_request)."""
    stride = getattr(engine, "stride", None)
    if not isinstance(stride, int) or stride < 1:
        return 0
    return max_step_rows(stride) - 1


def _pick(value, default, fallback):
    if value is not None:
        return value
    return default if default is not None else fallback




def create_app(runner: EngineRunner, model_name: str, on_ready: Callable[[], None] | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               draft_mode: str = DEFAULT_DRAFT_MODE["native"]) -> FastAPI:
    """The FastAPI app over a started ``runner``; ``on_ready`` runs once the server starts up. A request body over
    ``max_request_bytes`` is refused with 413; sampled requests draft by ``draft_mode``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        if on_ready is not None:
            on_ready()
        yield

    app = FastAPI(title="idlm", summary="OpenAI-compatible I-DLM (ISD) server", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    srv = _Server(runner, model_name, draft_mode)
    app.state.idlm = srv

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
        return _error_response(_bad(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/health")
    async def health():
        if not runner.is_alive():
            return JSONResponse({"status": "error", "message": "the engine worker is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": srv.created, "owned_by": "idlm",
            "max_model_len": runner.max_context,
        }]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_body(request, ChatCompletionRequest, max_request_bytes)
        prompt_ids = srv.chat_prompt(req.messages)
        params, stop = srv.sampling(req, len(prompt_ids), "messages", None)
        return await srv.respond(request, req, prompt_ids, params, stop, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_body(request, CompletionRequest, max_request_bytes)
        prompt_ids = srv.completion_prompt(req.prompt)
        params, stop = srv.sampling(req, len(prompt_ids), "prompt", COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await srv.respond(request, req, prompt_ids, params, stop, chat=False)

    return app


# ---------------------------------------------------------------------------------------------- serve
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one. UserError when it cannot bind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve host {host!r}: {exc}") from None
    family, stype, proto, _, addr = infos[0]
    sock = socket.socket(family, stype, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def server_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    stride: int | None = None,
    lora: str | None = None,
    device: str | None = None,
    max_batch_size: int = 16,
    served_model_name: str | None = None,
    dtype: str = "auto",
    log_level: str = "warning",
    max_request_bytes: int | None = None,
    draft_mode: str = DEFAULT_DRAFT_MODE["native"],
    adaptive_stride: bool = False,
) -> None:
    """Load the checkpoint into the reference ISD engine and serve it until interrupted; sampled requests draft by
    ``draft_mode`` (``sample`` or ``argmax``, both exact, see `idlm.isd`). ``adaptive_stride``: measure the decode
    step's cost at start-up and let `idlm.adaptive.AdaptiveStride` choose N (at most the stride) for every step."""
    import uvicorn

    from .engine import ISDEngine

    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    max_request_bytes = DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None else max_request_bytes
    if max_request_bytes < 1:
        raise UserError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    sock = bind_socket(host, port)  # fail on a taken port before the (slow) model load
    runner = None
    try:
        engine = ISDEngine.from_pretrained(model_dir, stride=stride, lora=lora, device=device, dtype=dtype,
                                           max_batch_size=max_batch_size)
        if adaptive_stride:
            from idlm.adaptive import AdaptiveStride

            sizes = sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
                           | {max_batch_size})
            table = engine.measure_step_costs(sizes)
            engine.stride_policy = AdaptiveStride(engine.stride, table)
            ms = {b: [round(1e3 * t, 1) for t in row] for b, row in zip(table.batch_sizes, table.seconds)}
            print(f"idlm serve: adaptive stride N <= {engine.stride}; decode step ms by batch size for N = "
                  f"1..{engine.stride}: {ms}", file=sys.stderr, flush=True)
        runner = EngineRunner(engine, max_batch_size=max_batch_size).start()
        name = served_model_name or Path(model_dir.rstrip("/")).name or model_dir
        url = server_url(sock)

        def ready() -> None:
            print(f"idlm serve: {name} ready at {url}/v1 (OpenAI-compatible; Ctrl-C to stop)", flush=True)

        app = create_app(runner, name, on_ready=ready, max_request_bytes=max_request_bytes, draft_mode=draft_mode)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if runner is not None:
            runner.stop()
        sock.close()
