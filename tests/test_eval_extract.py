"""Answer extraction: thinking stripping, multiple-choice letters (adversarial formats), \\boxed{}, code blocks."""

from __future__ import annotations

import pytest

from idlm.eval.extract import (
    boxed_contents,
    extract_choice,
    extract_humaneval_code,
    extract_lcb_code,
    extract_mbpp_code,
    last_boxed,
    mc_answer_region,
    strip_thinking_first,
    strip_thinking_last,
)


def test_thinking_first_vs_last():
    text = "<think>a</think> mid </think>\n\nfinal"
    assert strip_thinking_first(text) == "mid </think>\n\nfinal"
    assert strip_thinking_last(text) == "final"
    assert strip_thinking_first("no think") == "no think"
    assert strip_thinking_last(None) == ""


def test_mc_region_without_think_end_reads_only_the_tail():
    text = "The answer is (A). " + "x" * 600  # an unfinished thought: only the last 500 chars count
    assert mc_answer_region(text) == text[-500:]
    assert extract_choice(text) is None


@pytest.mark.parametrize("response,expected", [
    ("<think>maybe (C)?</think>The answer is (B).", "B"),
    ("<think>..</think>The answer is **C**", "C"),
    ("<think>..</think>**The answer is: D**", "D"),
    ("<think>..</think>The answer is B. Paris is the capital.", "B"),
    ("<think>..</think>the answer is (a)", "A"),                 # lower case only inside parentheses
    ("<think>..</think>The answer is a bit unclear, so (C)", "C"),  # "a bit" is not an answer
    ("<think>..</think>The answer is Avogadro's number, i.e. (D)", "D"),
    ("<think>..</think>Final: $\\boxed{\\text{B}}$", "B"),       # the anchor's regex reads this as E
    ("<think>..</think>$\\boxed{(C)}$", "C"),
    ("<think>..</think>\\boxed{D. 42}", "D"),
    ("<think>..</think>So I pick **A**", "A"),
    ("<think>..</think>reasoning\nC.", "C"),
    ("<think>..</think>I cannot decide.", None),
    ("", None),
    ("<think>..</think>The answer is (E)", None),                 # only A-D exist
])
def test_extract_choice_answer_is(response, expected):
    assert extract_choice(response, 4, "answer_is") == expected


def test_extract_choice_ten_options_and_styles():
    assert extract_choice("<think>x</think>The answer is (J)", 10) == "J"
    assert extract_choice("<think>x</think>blah\nANSWER: C", 4, "answer_colon") == "C"
    assert extract_choice("<think>x</think>**Answer:** B) because", 4, "answer_colon") == "B"
    assert extract_choice("<think>x</think>Therefore, the correct answer is option D", 4, "option") == "D"
    assert extract_choice("<think>x</think>the correct answer is option **B**.", 4, "option") == "B"


def test_boxed_nested_and_last():
    t = "first \\boxed{1} then \\boxed{\\frac{1}{2}} and \\boxed 7"
    assert boxed_contents(t)[:2] == ["1", "\\frac{1}{2}"]
    assert last_boxed(t) == "7"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


def test_mbpp_code_picks_last_python_block_with_def():
    r = ("<think>```python\ndef wrong(): pass\n```</think>Here:\n```python\ndef f(x):\n    return 1\n```\n"
         "and tests\n```python\nassert f(1) == 1\n```")
    assert extract_mbpp_code(r).strip() == "def f(x):\n    return 1"
    assert extract_mbpp_code("```python\ndef g():\n    return 2\n").strip() == "def g():\n    return 2"  # unclosed
    assert extract_mbpp_code("def h(): return 3") == "def h(): return 3"


def test_humaneval_code_first_block_and_body_only():
    r = "<think>x</think>```python\ndef add(a, b):\n    return a + b\n```\n```python\nprint(1)\n```"
    assert extract_humaneval_code(r, "add").startswith("def add(a, b):")
    body = "<think>x</think>```python\n    return a + b\n```"
    assert extract_humaneval_code(body, "add") == "    return a + b\n"  # indentation kept
    assert extract_humaneval_code("★ ```python\nimport math\n```", "f").startswith("import math")


def test_lcb_code_between_last_two_fences():
    r = "<think>```python\nx\n```</think>text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```"
    assert extract_lcb_code(r) == "print(2)"
    assert extract_lcb_code("<think>a</think>no code") == ""


def test_humaneval_body_starting_with_a_nested_def_or_import_keeps_its_indentation():
    body = "    import math\n    return math.sqrt(x)\n"
    assert extract_humaneval_code(f"<think>x</think>```python\n{body}```", "f") == body
    nested = "    def helper(y):\n        return y\n    return helper(x)\n"
    assert extract_humaneval_code(f"<think>x</think>\n```python\n{nested}```", "f") == nested
    assert extract_humaneval_code(f"<think>x</think>\n\n{nested}", "f") == nested  # unfenced after </think>
    assert extract_humaneval_code(f"<think>x</think>\n\n{nested}", None) == nested  # a helper is not a whole def
    whole = "    def f(x):\n        return x\n"  # a whole function indented as a block is dedented
    assert extract_humaneval_code(f"<think>x</think>```python\n{whole}```", "f") == "def f(x):\n    return x\n"


@pytest.mark.parametrize("response,style,expected", [
    ("<think>x</think>The answer is (A). Wait, that was wrong: the answer is (C).", "answer_is", "C"),
    ("<think>x</think>So the answer is **B**.\n\nOn reflection, the answer is **D**", "answer_is", "D"),
    ("<think>x</think>Reasoning...\nANSWER: $C$", "answer_colon", "C"),          # what GPQA's prompt literally asks
    ("<think>x</think>ANSWER: $\\text{B}$", "answer_colon", "B"),
    ("<think>x</think>ANSWER: A\nHmm, no.\nANSWER: B", "answer_colon", "B"),   # the final line counts
    ("<think>x</think>\\boxed{A} is tempting, but \\boxed{C}", "answer_is", "C"),
    ("<think>x</think>the correct answer is option A... no, the correct answer is option B", "option", "B"),
    ("<think>x</think>ANSWER: $E$", "answer_colon", None),
])
def test_extract_choice_takes_the_final_answer(response, style, expected):
    assert extract_choice(response, 4, style) == expected
