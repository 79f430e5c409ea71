"""Math answer scoring: math-verify equivalence (the anchor's MATH-500 scorer) with a fallback normaliser, and the
integer / number extractors of GSM8K, AIME and MathBench.

math-verify guards its sympy work with ``signal.alarm``, which only works in the main thread; elsewhere the
calls run without its timeouts (``parsing_timeout=None``, ``timeout_seconds=None``). The fallback normaliser
(used when math-verify is missing or fails) compares normalised strings, then numbers (fractions, decimals,
percent, simple LaTeX), then sympy-simplified differences when sympy is importable.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
import threading
from fractions import Fraction

from .extract import last_boxed, strip_thinking_first, strip_thinking_last

log = logging.getLogger(__name__)

_MV_STATE: dict = {}


def _math_verify():
    if "mod" not in _MV_STATE:
        try:
            import math_verify  # noqa: F401
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

            _MV_STATE["mod"] = (parse, verify, LatexExtractionConfig, ExprExtractionConfig)
        except Exception as exc:  # ImportError, or an antlr runtime mismatch
            log.info("math-verify unavailable (%s); using the fallback normaliser", exc)
            _MV_STATE["mod"] = None
    return _MV_STATE["mod"]


def have_math_verify() -> bool:
    return _math_verify() is not None


def _timeouts() -> dict:
    main = threading.current_thread() is threading.main_thread()
    return {} if main else {"parsing_timeout": None}


def math_verify_equal(gold: str, response: str) -> bool | None:
    """The anchor's MATH-500 rule: gold parsed as ``$gold$`` (first match), the response with \\boxed first.
    None when math-verify is unavailable or raised."""
    mv = _math_verify()
    if mv is None:
        return None
    parse, verify, Latex, Expr = mv
    kw = _timeouts()
    try:
        g = parse(f"${gold}$", extraction_mode="first_match", extraction_config=[Latex(), Expr()], **kw)
        p = parse(response, extraction_config=[Latex(boxed_match_priority=0), Expr()], **kw)
        if not g or not p:
            return False if g else None
        vkw = {} if not kw else {"timeout_seconds": None}
        return bool(verify(g, p, **vkw))
    except Exception as exc:  # math-verify raises on odd input and on its own timeouts
        log.debug("math-verify failed on %r / %r: %s", gold, response[-200:], exc)
        return None


# ---------------------------------------------------------------------------------------------- fallback
_TEXT_CMDS = r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"


def normalize_answer(s: str | None) -> str:
    """A canonical string for a final answer (LaTeX or plain): spacing, $, \\left/\\right, \\dfrac, units text,
    degrees, trailing period, leading "x =" are removed; "0.5" and ".5" agree; "\\frac12" becomes "\\frac{1}{2}"."""
    if s is None:
        return ""
    s = str(s).strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("°", "")
    s = s.replace("\\%", "%").replace("$", "")
    s = re.sub(_TEXT_CMDS, r"\1", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s+(?:units?|cm|m|km|degrees?|dollars?|cents?|inches|feet|meters?|hours?|minutes?|seconds?)\s*$",
               "", s)
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<![\d])\.(\d)", r"0.\1", s)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)  # 1,000 -> 1000
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    return s


def to_number(s: str | None) -> Fraction | None:
    """A rational value for plain numbers, fractions (a/b, \\frac{a}{b}), percentages and mixed signs; else None."""
    if s is None:
        return None
    t = normalize_answer(s)
    pct = t.endswith("%")
    t = t.rstrip("%")
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", t)
    try:
        if m:
            v = Fraction(m.group(2)) / Fraction(m.group(3))
            v = -v if m.group(1) else v
        elif re.fullmatch(r"-?\d+(?:\.\d+)?/-?\d+(?:\.\d+)?", t):
            a, b = t.split("/")
            v = Fraction(a) / Fraction(b)
        elif re.fullmatch(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", t):
            v = Fraction(t)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return v / 100 if pct else v


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations
    except ImportError:
        return False

    def conv(x: str):
        x = normalize_answer(x)
        x = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", x)
        x = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", x)
        x = re.sub(r"\\sqrt(\d)", r"sqrt(\1)", x)
        x = x.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
        x = x.replace("{", "(").replace("}", ")")
        if "\\" in x or len(x) > 200:
            raise ValueError("not a plain expression")
        return parse_expr(x, transformations=standard_transformations + (implicit_multiplication_application,),
                          evaluate=True)

    try:
        return bool(sympy.simplify(conv(a) - conv(b)) == 0)
    except Exception:  # noqa: BLE001 - anything sympy cannot read is "not equal"
        return False


def _decimal_places(s: str) -> int | None:
    """Digits after the point of a plain decimal answer ("0.333" -> 3); None for anything else."""
    m = re.fullmatch(r"[-+]?\d*\.(\d+)", normalize_answer(s))
    return len(m.group(1)) if m else None


def numbers_equal(gold: str, pred: str) -> bool | None:
    """Exact rational equality of two numeric answers; a prediction written as a decimal with at least
    ``ROUNDED_MIN_PLACES`` places also matches the gold value rounded to that many places (1/3 and "0.333").
    None when either side is not a number. No relative tolerance: 1000000 and 1000001 differ."""
    gn, pn = to_number(gold), to_number(pred)
    if gn is None or pn is None:
        return None
    if gn == pn:
        return True
    d = _decimal_places(pred)
    return d is not None and d >= ROUNDED_MIN_PLACES and abs(gn - pn) <= Fraction(1, 2 * 10 ** d)


ROUNDED_MIN_PLACES = 3


def fallback_equal(gold: str, pred: str | None) -> bool:
    """Equality without math-verify: normalised strings, then numbers (exact, see ``numbers_equal``), then (small)
    sympy expressions."""
    if pred is None:
        return False
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not p:
        return False
    if g == p:
        return True
    num = numbers_equal(gold, pred)
    if num is not None:
        return num
    return _sympy_equal(gold, pred)


def answer_equal(gold: str, answer: str | None) -> tuple[bool, str]:
    """(equal, method) for an extracted final answer: math-verify on ``\\boxed{answer}`` first (as MATH-500), then
    the fallback normaliser, which can only add exact equalities."""
    if answer is None or not str(answer).strip():
        return False, "none"
    mv = math_verify_equal(gold, f"\\boxed{{{answer}}}")
    if mv is True:
        return True, "math_verify"
    if fallback_equal(gold, answer):
        return True, "normalised"
    return False, "math_verify" if mv is not None else "normalised"


def math_equal(gold: str, response: str) -> tuple[bool, str | None, str]:
    """(correct, extracted answer, method) for a MATH-style response (thinking stripped up to the last ``</think>``).

    math-verify decides when it is available; the fallback normaliser decides otherwise (and, when math-verify says
    "not equal" but the boxed strings normalise equal, the sample counts as correct: math-verify misses some
    plain-text forms)."""
    text = strip_thinking_last(response)
    boxed = last_boxed(text, skip_empty=True)
    mv = math_verify_equal(gold, text)
    if mv is True:
        return True, boxed, "math_verify"
    fb = fallback_equal(gold, boxed if boxed is not None else _last_answer_phrase(text))
    if fb:
        return True, boxed, "normalised"
    return False, boxed, "math_verify" if mv is not None else "normalised"


def _last_answer_phrase(text: str) -> str | None:
    m = list(re.finditer(r"(?i)(?:final answer|the answer) is:?\s*\$?([^\n$]+?)\$?\s*(?:\.|$)", text))
    return m[-1].group(1).strip() if m else None


# ---------------------------------------------------------------------------------------------- GSM8K
def gsm8k_gold(answer_field: str) -> str:
    return answer_field.split("####")[-1].strip().replace(",", "")


def gsm8k_extract(response: str) -> str | None:
    """The anchor's rule: the last ``\\boxed{}`` in the FULL response (thinking included), else the last number
    after ``</think>``. An empty box does not count (the anchor's ``\\boxed\\{([^}]+)\\}`` skips it too; Qwen3
    repeats "within \\boxed{}" while thinking). ``\\text{}``, ``$`` and thousands commas are removed; LaTeX
    arithmetic is kept for ``gsm8k_value``."""
    b = last_boxed(response or "", skip_empty=True)
    if b is not None:
        b = re.sub(_TEXT_CMDS, r"\1", b)
        for tok in ("{,}", "\\$", "$", "\\!", "\\,", "\\;", "\\ "):
            b = b.replace(tok, " " if tok == "\\ " else "")
        b = re.sub(r"(\d),(?=\d)", r"\1", b).replace("\\%", "%").strip()
        if b:
            return b
    after = strip_thinking_last(response or "")
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", after)
    return nums[-1].replace(",", "") if nums else None


_ARITH_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith_value(expr: str) -> Fraction | None:
    """The exact value of a small arithmetic expression in plain or LaTeX notation (``14^{2}``, ``3 \\times 4``,
    ``\\frac{10}{2}``, ``(2+3)*4``); None for anything else. Parsed with ``ast``, never ``eval``."""
    s = re.sub(r"\\(?:left|right)\b", "", expr)
    s = s.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("×", "*").replace("÷", "/")
    for _ in range(8):  # nested \frac{}{}: innermost first
        t = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
        if t == s:
            break
        s = t
    s = s.replace("^", "**").replace("{", "(").replace("}", ")")
    if not re.fullmatch(r"[\d\s+\-*/().]+", s) or len(s) > 200:
        return None
    try:
        tree = ast.parse(s.strip(), mode="eval")
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> Fraction:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int | float) and not isinstance(n.value, bool):
            return Fraction(str(n.value))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub | ast.UAdd):
            v = ev(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow):
            base, exp = ev(n.left), ev(n.right)
            if exp.denominator != 1 or abs(exp) > 64 or abs(base) > 10 ** 12:
                raise ValueError("exponent out of range")
            return base ** int(exp)
        if isinstance(n, ast.BinOp) and type(n.op) in _ARITH_OPS:
            return _ARITH_OPS[type(n.op)](ev(n.left), ev(n.right))
        raise ValueError(f"not arithmetic: {type(n).__name__}")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def gsm8k_value(pred: str | None) -> Fraction | None:
    """The number a GSM8K answer states: the part after the last "=" (``14 - 2 = 12`` is 12), as a number (a
    trailing percent sign or unit words dropped), else as an arithmetic expression (``14^{2}`` is 196), else the
    one number among words (``18 apples``); None when there is no single number (``18 apples and 3 pears``)."""
    if pred is None:
        return None
    s = pred.rsplit("=", 1)[-1].strip()
    s = re.sub(r"\s*(?:\\?%|percent)\s*$", "", s)  # GSM8K golds omit the percent sign
    v = to_number(s)
    if v is None:
        v = _arith_value(s)
    if v is None:
        nums = re.findall(r"-?\d+(?:\.\d+)?", s)
        v = Fraction(nums[0]) if len(nums) == 1 else None
    return v


def gsm8k_equal(gold: str, pred: str | None) -> bool:
    """String equality as in the anchor, else equal values (``gsm8k_value``): "18.00", "18 dollars", ``14 - 2 = 12``
    and ``3 \\times 4`` are right for 18, 18, 12 and 12."""
    if pred is None:
        return False
    if pred == gold:
        return True
    gn, pn = to_number(gold), gsm8k_value(pred)
    return gn is not None and pn is not None and gn == pn


# ---------------------------------------------------------------------------------------------- AIME
def aime_extract(response: str) -> int | None:
    """After the first ``</think>``: the last ``\\boxed{}`` as an integer (commas/spaces removed, else its first
    integer); else the last 1-3 digit number in the text."""
    text = strip_thinking_first(response or "")
    b = last_boxed(text)
    if b is not None:
        s = re.sub(_TEXT_CMDS, r"\1", b).replace(",", "").replace(" ", "").replace("$", "")
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        m = re.search(r"-?\d+", s)
        if m:
            return int(m.group(0))
    nums = re.findall(r"\b(\d{1,3})\b", text)
    return int(nums[-1]) if nums else None


# ---------------------------------------------------------------------------------------------- MathBench cloze
def mathbench_cloze_extract(response: str) -> str | None:
    """After the first ``</think>``: the last ``\\boxed{}``; else OC's rule (first number after "The answer is",
    else the last number)."""
    text = strip_thinking_first(response or "")
    b = last_boxed(text, skip_empty=True)
    if b is not None:
        return b
    parts = re.split(r"The answer is|答案是", text)
    tail = parts[-1] if len(parts) > 1 else text
    tail = re.sub(r"(\d),(\d)", r"\1\2", tail)
    nums = re.findall(r"-?\d*\.?/?\d+|\d+", tail)
    if not nums:
        return None
    return nums[0] if len(parts) > 1 else nums[-1]
