"""Math answer scoring: math-verify and the fallback normaliser, GSM8K, AIME and MathBench extractors."""

from __future__ import annotations

import pytest

from idlm.eval import mathscore as M

CASES = [  # (gold, response, correct)
    ("\\frac{1}{2}", "<think>..</think>So $\\boxed{\\frac{1}{2}}$.", True),
    ("\\frac{1}{2}", "<think>..</think>\\boxed{0.5}", True),
    ("\\frac{1}{2}", "<think>..</think>\\boxed{\\dfrac12}", True),
    ("\\frac{1}{2}", "<think>..</think>\\boxed{1/2}", True),
    ("10", "<think>..</think>The answer is \\boxed{10}", True),
    ("10", "<think>..</think>The answer is \\boxed{10.0}", True),
    ("10", "<think>the answer is \\boxed{10}</think>\\boxed{11}", False),  # the final answer counts
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "<think>..</think>\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("2\\sqrt{3}", "<think>..</think>\\boxed{2\\sqrt3}", True),
    ("5", "<think>..</think>no answer here", False),
    ("5", "", False),
    ("30^\\circ", "<think>..</think>\\boxed{30}", True),
]


@pytest.mark.parametrize("gold,response,correct", CASES)
def test_math_equal(gold, response, correct):
    ok, _, _ = M.math_equal(gold, response)
    assert ok is correct


@pytest.mark.parametrize("gold,response,correct", CASES)
def test_math_equal_fallback_without_math_verify(monkeypatch, gold, response, correct):
    monkeypatch.setitem(M._MV_STATE, "mod", None)  # as if math-verify were not installed
    ok, _, method = M.math_equal(gold, response)
    assert method == "normalised"
    assert ok is correct


def test_math_verify_is_used_when_installed():
    pytest.importorskip("math_verify")
    assert M.have_math_verify()
    ok, extracted, method = M.math_equal("\\frac{1}{2}", "<think>x</think>\\boxed{\\frac{2}{4}}")
    assert ok and extracted == "\\frac{2}{4}" and method == "math_verify"


def test_normalizer_and_numbers():
    assert M.normalize_answer("$x = 5$.") == "5"
    assert M.normalize_answer("\\text{12 } \\mathrm{cm}") == "12cm" or M.to_number("12 cm") == 12
    assert M.to_number("50\\%") == M.to_number("0.5")
    assert M.to_number("1,000") == 1000
    assert M.to_number("-\\frac{3}{4}") == M.to_number("-0.75")
    assert M.to_number("abc") is None
    assert M.fallback_equal("x^2+2x", "2x + x^2")  # sympy


@pytest.mark.parametrize("response,expected", [
    ("<think>I guess \\boxed{5}</think>Total: \\boxed{1,234}.", "1234"),
    ("<think>x</think>\\boxed{\\$18}", "18"),
    ("<think>x</think>\\boxed{\\text{18 dollars}}", "18 dollars"),
    ("<think>x</think>She earns 18 dollars, then 20.", "20"),
    ("<think>x</think>nothing", None),
])
def test_gsm8k_extract(response, expected):
    assert M.gsm8k_extract(response) == expected


def test_gsm8k_equal():
    assert M.gsm8k_gold("blah\n#### 1,234") == "1234"
    assert M.gsm8k_equal("18", "18")
    assert M.gsm8k_equal("18", "18.00")
    assert M.gsm8k_equal("18", "18 dollars")
    assert not M.gsm8k_equal("18", "19")
    assert not M.gsm8k_equal("18", None)


@pytest.mark.parametrize("response,expected", [
    ("<think>\\boxed{1}</think>The answer is \\boxed{073}.", 73),
    ("<think>x</think>\\boxed{1,000}", 1000),
    ("<think>x</think>\\boxed{m+n=45}", 45),
    ("<think>x</think>so the answer is 204", 204),
    ("<think>x</think>no digits", None),
])
def test_aime_extract(response, expected):
    assert M.aime_extract(response) == expected


def test_mathbench_cloze_extract():
    assert M.mathbench_cloze_extract("<think>x</think>\\boxed{7}") == "7"
    assert M.mathbench_cloze_extract("<think>x</think>The answer is 1,200 apples and 3") == "1200"
    assert M.mathbench_cloze_extract("<think>x</think>we get 3 then 9") == "9"
    assert M.mathbench_cloze_extract("<think>x</think>none") is None


@pytest.mark.parametrize("gold,response,correct", [
    ("12", "<think>x</think>\\boxed{14 - 2 = 12}", True),     # the value after the last "=" counts, not 14
    ("14", "<think>x</think>\\boxed{14 - 2 = 12}", False),
    ("196", "<think>x</think>\\boxed{14^{2}}", True),        # an expression is evaluated, not read as 14
    ("14", "<think>x</think>\\boxed{14^{2}}", False),
    ("12", "<think>x</think>\\boxed{3 \\times 4}", True),
    ("18", "<think>x</think>\\boxed{\\$18.00}", True),
    ("18", "<think>x</think>\\boxed{18 \\text{ apples}}", True),
    ("18", "<think>x</think>\\boxed{18 apples and 3 pears}", False),  # two numbers: no single value
    ("5", "<think>x</think>\\boxed{\\frac{10}{2}}", True),
])
def test_gsm8k_boxed_value(gold, response, correct):
    assert M.gsm8k_equal(gold, M.gsm8k_extract(response)) is correct


def test_gsm8k_empty_box_does_not_block_the_fallback():
    # Qwen3 repeats the instruction while thinking; the answer itself is not boxed
    r = "<think>I must put the final answer within \\boxed{}. 5 + 7 = 12</think>The total is 12 apples."
    assert M.gsm8k_extract(r) == "12"
    assert M.gsm8k_extract("<think>\\boxed{ }</think>\\boxed{}") is None


def test_fallback_numbers_are_exact_except_for_rounded_decimals():
    assert not M.fallback_equal("1000000", "1000001")
    assert not M.fallback_equal("0.0001", "0.0001001")
    assert M.fallback_equal("1000000", "1,000,000")
    assert M.fallback_equal("\\frac{1}{3}", "0.333")         # a decimal rounded to its last digit
    assert not M.fallback_equal("\\frac{1}{3}", "0.3")       # too coarse
    assert not M.fallback_equal("\\frac{1}{3}", "0.334")


def test_mathbench_cloze_uses_the_math_rule(monkeypatch):
    from idlm.eval.tasks import Item, MathBench

    b = MathBench()
    it = Item("primary/cloze_en/0", {"set": "primary", "kind": "cloze_en", "question": "q", "gold": "1000000"})
    assert b.score(it, None, "<think>x</think>\\boxed{1000001}").score == 0.0
    assert b.score(it, None, "<think>x</think>\\boxed{1,000,000}").score == 1.0
    monkeypatch.setitem(M._MV_STATE, "mod", None)  # without math-verify the fallback decides
    assert b.score(it, None, "<think>x</think>\\boxed{1000001}").score == 0.0
