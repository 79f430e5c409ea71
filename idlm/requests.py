"""The rules for one decoding request's sampling parameters, in one place.

The `idlm generate` command, the native server and the reference engine all check a request with these functions,
so a value is accepted or refused the same way everywhere. Each check raises `InvalidRequest` (a ``ValueError``)
whose message names the field as the caller spells it (``--top-k`` on the command line, ``'top_k'`` in the HTTP
API) and whose ``param`` is the field's own name; valid values come back normalised (ints as int, floats as float).

Bounds exist so that a value reaches the tensors as the number it says: ids, seeds and ``top_k`` must fit a signed
64-bit integer (``torch.long``), floats must be finite, and a temperature above ``MAX_TEMPERATURE`` is refused (in
float32 it would divide the logits into a uniform or NaN distribution).
"""

from __future__ import annotations

import math
from typing import Any

# How sampled requests draft (idlm.isd): both exact. When none is named, per engine: the reference engine samples its
# drafts (on SmolLM2-135M + the demo adapter at temperature 1 that accepted more: TPF 1.27 against 1.18 with argmax,
# 1.49 against 1.53 at 0.6; docs/isd.md), SGLang drafts by argmax (no [N - 1, V] q kept per request on the GPU and
# no processing pass over the draft rows' vocabulary in the step).
SERVING_DRAFT_MODES = ("sample", "argmax")
DEFAULT_DRAFT_MODE = {"native": "sample", "sglang": "argmax"}

INT64_MIN = -(2 ** 63)
INT64_MAX = 2 ** 63 - 1
MAX_TEMPERATURE = 100.0
_SHOWN_CHARS = 40


class InvalidRequest(ValueError):
    """A request field with a bad value; ``param`` is the field's name, the message names it as the caller does."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def clip(text: str) -> str:
    """``text`` for an error message, cut short when it is long (a hostile value may have thousands of digits)."""
    return text if len(text) <= _SHOWN_CHARS else f"{text[:12]}... ({len(text)} characters)"


def show(value: Any) -> str:
    """A value for an error message: numbers as written, strings quoted, either cut short when long."""
    if isinstance(value, int) and value.bit_length() > 128:  # str() of > 4300 digits raises; nobody reads them
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return clip(repr(value) if isinstance(value, str) else str(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_greedy(temperature: Any, top_k: Any) -> Any:
    """The one greedy rule, SGLang's: temperature <= 0, or top_k == 1 (a single candidate left; 0 and -1 mean no
    top-k). For Python numbers (a bool) and for [B] tensors alike (a bool tensor); the native engine, the SGLang
    worker and the sampler all decide by it."""
    return (temperature <= 0) | (top_k == 1)


def check_temperature(value: Any, name: str = "temperature", param: str = "temperature") -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0 <= value <= MAX_TEMPERATURE:
        raise InvalidRequest(f"{name} must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {show(value)}",
                             param)
    return float(value)


def check_draft_temperature(value: Any, name: str = "draft_temperature", param: str = "draft_temperature") -> float:
    """The draft rows' temperature relative to the request's (1 = the same; below 1 sharper drafts). Any value keeps
    the output exact: the verifier judges each draft against the distribution it was drawn from."""
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 4:
        raise InvalidRequest(f"{name} must be a number in (0, 4], got {show(value)}", param)
    return float(value)


def check_top_p(value: Any, name: str = "top_p", param: str = "top_p") -> float:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise InvalidRequest(f"{name} must be in (0, 1], got {show(value)}", param)
    return float(value)


def check_top_k(value: Any, name: str = "top_k", param: str = "top_k", minus_one_is_off: bool = False) -> int:
    """``top_k`` >= 0 (0 = off; with ``minus_one_is_off`` -1 is off too, as OpenAI-style servers spell it).
    Returns 0 for off."""
    low = -1 if minus_one_is_off else 0
    if not _is_int(value) or not low <= value <= INT64_MAX:
        off = "0 or -1 = off" if minus_one_is_off else "0 = off"
        raise InvalidRequest(f"{name} must be an integer in [0, 2^63 - 1] ({off}), got {show(value)}", param)
    return max(int(value), 0)


def check_seed(value: Any, name: str = "seed", param: str = "seed") -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRequest(f"{name} must be an integer in [-2^63, 2^63 - 1], got {show(value)}", param)
    return int(value)


def check_max_new_tokens(value: Any, name: str = "max_new_tokens", param: str = "max_new_tokens") -> int:
    if not _is_int(value) or value < 1:
        raise InvalidRequest(f"{name} must be >= 1 (an integer), got {show(value)}", param)
    return int(value)


def check_sampling(temperature: Any, top_p: Any, top_k: Any, seed: Any = None, max_new_tokens: Any = 1,
                   spell=lambda field: field) -> dict[str, Any]:
    """Check every field; returns the normalised values by field name. ``spell(field)`` is how the caller names a
    field in messages (e.g. ``lambda f: "--" + f.replace("_", "-")``)."""
    return {
        "max_new_tokens": check_max_new_tokens(max_new_tokens, spell("max_new_tokens")),
        "temperature": check_temperature(temperature, spell("temperature")),
        "top_p": check_top_p(top_p, spell("top_p")),
        "top_k": check_top_k(top_k, spell("top_k")),
        "seed": check_seed(seed, spell("seed")),
    }
