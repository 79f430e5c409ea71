"""JSON from untrusted text (HTTP request bodies, training-data rows) without the ways ``json.loads`` breaks.

`loads` parses like ``json.loads`` and raises one `JSONInputError` (a ``ValueError``) for everything that would
otherwise surface later as a crash: text that is not JSON, nesting deeper than ``max_depth`` (``json.loads`` itself
dies with RecursionError near 1,000 levels, and later code that recurses over the value dies sooner), integer
literals longer than ``MAX_INT_DIGITS`` (Python refuses to convert more than 4,300 digits and converting long ones
takes quadratic time), and strings holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON, but no tokenizer or
UTF-8 encoder takes it). The error's ``kind`` says which (``syntax``, ``encoding``, ``depth``, ``integer``,
``surrogate``) and its ``path`` where, as a tuple of keys and indexes (`format_path` writes it as
``messages[0].content``). `decode_at` does the same for one value inside a larger text (rows of a JSON array).
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 100
MAX_INT_DIGITS = 1000


class JSONInputError(ValueError):
    def __init__(self, message: str, kind: str, path: tuple = (), pos: int | None = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.path = path
        self.pos = pos  # character offset of a syntax error, when known


def format_path(parts: tuple | list) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JSONInputError(f"an integer literal has {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})",
                             "integer")
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
                                     "surrogate", path)
            continue
        if isinstance(item, dict):
            pairs = item.items()
        elif isinstance(item, list):
            pairs = enumerate(item)
        else:
            continue
        if depth > max_depth:  # named by its top-level field: the full path would be max_depth parts long
            raise JSONInputError(f"the JSON nests deeper than {max_depth} levels{_where(path[:1])}", "depth",
                                 path[:1])
        for key, child in pairs:
            if isinstance(key, str) and _has_surrogate(key):
                raise JSONInputError(f"a key{_where(path)} holds a lone UTF-16 surrogate (not valid Unicode text)",
                                     "surrogate", path)
            if isinstance(child, str | dict | list):
                stack.append((child, depth + 1, path + (key,)))


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _decode(parse, max_depth: int) -> Any:
    try:
        return parse()
    except JSONInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"{exc.msg} (line {exc.lineno} column {exc.colno})", "syntax", pos=exc.pos) from None
    except UnicodeDecodeError as exc:
        raise JSONInputError(f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start}",
                             "encoding") from None
    except RecursionError:
        raise JSONInputError(f"the JSON nests deeper than {max_depth} levels", "depth") from None
    except ValueError as exc:  # e.g. a number Python cannot convert
        raise JSONInputError(str(exc), "syntax") from None


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads(text)``, checked as the module docstring says; every failure is a JSONInputError."""
    value = _decode(lambda: json.loads(text, parse_int=_parse_int), max_depth)
    check_value(value, max_depth)
    return value


def decode_at(text: str, pos: int, max_depth: int = MAX_DEPTH) -> tuple[Any, int]:
    """(value, end) of the JSON value that starts at ``text[pos]`` (``JSONDecoder.raw_decode``), checked like
    `loads`."""
    value, end = _decode(lambda: _DECODER.raw_decode(text, pos), max_depth)
    check_value(value, max_depth)
    return value, end
