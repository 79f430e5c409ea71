"""JSON from untrusted text (HTTP request bodies, training-data rows) without the ways ``json.loads`` breaks.

`loads` parses like ``json.loads`` and raises one `JSONInputError` (a ``ValueError``) for everything that would
otherwise surface later as a crash: text that is not JSON, nesting deeper than ``max_depth`` (``json.loads`` itself
dies with RecursionError near 1,000 levels, and later code that recurses over the value dies sooner), integer
literals longer than ``MAX_INT_DIGITS`` (Python refuses to convert more than 4,300 digits and converting long ones
takes quadratic time), and strings holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON, but no tokenizer or
UTF-8 encoder takes it). The error's ``path`` says where, as a tuple of keys and indexes (`format_path` writes it as
``messages[0].content``).
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 100
MAX_INT_DIGITS = 1000


class JSONInputError(ValueError):
    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.message = message
        self.path = path


def format_path(parts: tuple | list) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError(f"an integer literal has {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _where(path: tuple) -> str:
    return f" at {format_path(path)}" if path else ""


def check_value(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONInputError if a parsed value nests deeper than ``max_depth`` or holds a lone surrogate."""
    stack: list[tuple[Any, int, tuple]] = [(value, 1, ())]
    while stack:  # iterative: the value may be deep
        item, depth, path = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                raise JSONInputError(f"a string{_where(path)} holds a lone UTF-16 surrogate (not valid Unicode text)",
                                     path)
            continue
        if isinstance(item, dict):
            pairs = item.items()
        elif isinstance(item, list):
            pairs = enumerate(item)
        else:
            continue
        if depth > max_depth:  # named by its top-level field: the full path would be max_depth parts long
            raise JSONInputError(f"the JSON nests deeper than {max_depth} levels{_where(path[:1])}", path[:1])
        for key, child in pairs:
            if isinstance(key, str) and _has_surrogate(key):
                raise JSONInputError(f"a key{_where(path)} holds a lone UTF-16 surrogate (not valid Unicode text)",
                                     path)
            if isinstance(child, str | dict | list):
                stack.append((child, depth + 1, path + (key,)))


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, checked as the module docstring says; every failure is a JSONInputError."""
    try:
        value = json.loads(text, parse_int=_parse_int)
    except JSONInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise JSONInputError(f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start}") from None
    except RecursionError:
        raise JSONInputError(f"the JSON nests deeper than {max_depth} levels") from None
    except ValueError as exc:  # e.g. a float literal Python cannot convert
        raise JSONInputError(f"not valid JSON: {exc}") from None
    check_value(value, max_depth)
    return value
