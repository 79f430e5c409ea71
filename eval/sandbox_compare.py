"""LiveCodeBench output comparison, done by the harness (never inside the sandbox, which never sees the expected
outputs): standard-input programs line by line with decimal tokens, LeetCode-style calls as JSON values."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any


def same_output(got: str, want: str) -> bool:
    """Lines compared after stripping; a line that differs as text may still match token by token as decimals."""
    g = got.strip().split("\n")
    w = want.strip().split("\n")
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        a, b = a.strip(), b.strip()
        if a == b:
            continue
        ta, tb = a.split(), b.split()
        if len(ta) != len(tb):
            return False
        try:
            if any(Decimal(x) != Decimal(y) for x, y in zip(ta, tb)):
                return False
        except (InvalidOperation, ValueError):
            return False
    return True


def same_value(got_json: str, want: Any) -> bool:
    """A call's result (JSON text from the sandbox) against the expected value (already parsed). Tuples arrive as
    lists; any text that is not JSON is a wrong answer."""
    try:
        got = json.loads(got_json)
    except (TypeError, ValueError):
        return False
    return got == want
