"""Benchmarks on the committed fixtures: loading, prompts, scoring of right/wrong answers, suites, IFEval."""

from __future__ import annotations

import base64
import io
import json
import pickle
import zlib
from pathlib import Path

import pytest

from idlm.errors import UserError
from idlm.eval import tasks as T

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a missing fixture must fail fast, not try the hub


def load(name):
    b = T.get_benchmark(name)
    return b, b.load(FIX, verify=False)


def test_every_benchmark_loads_its_fixture_and_builds_prompts():
    for name in T.BENCHMARKS:
        b, items = load(name)
        assert items, name
        for it in items:
            for v in b.variants_for(it):
                msgs = b.messages(it, v)
                assert msgs[-1]["role"] == "user" and msgs[-1]["content"].strip()


def test_fixture_checksums_differ_so_verification_refuses_them():
    b = T.get_benchmark("gsm8k")
    with pytest.raises(UserError, match="sha256"):
        b.load(FIX, verify=True)


def test_multiple_choice_benchmarks():
    b, items = load("arc_c")
    it = items[0]
    assert not it.data["question"].startswith("Question:")
    assert b.messages(it, None)[0]["content"].endswith('give your answer as "The answer is (X)".')
    gold = it.data["gold"]
    wrong = "A" if gold != "A" else "B"
    assert b.score(it, None, f"<think>x</think>The answer is ({gold})").score == 1.0
    assert b.score(it, None, f"<think>x</think>The answer is ({wrong})").score == 0.0
    b, items = load("mmlu_pro")
    assert [i.data["gold"] for i in items] == ["D", "C"]
    assert len(items[1].data["options"]) == 5
    assert "J. 15" in b.messages(items[0], None)[0]["content"]
    b, items = load("mmlu")
    assert [i.data["gold"] for i in items] == ["B", "B"]


def test_gpqa_shuffle_is_deterministic_and_prompt_matches_the_anchor():
    b, items = load("gpqa_diamond")
    again = b.load(FIX, verify=False)
    assert [i.data["options"] for i in items] == [i.data["options"] for i in again]
    it = items[0]
    assert it.data["options"]["ABCD".index(it.data["gold"])] == "Nitrogen"
    text = b.messages(it, None)[0]["content"]
    assert text.startswith("Answer the following multiple choice question. The last line of your response")
    assert "\n\nA) " in text
    assert b.score(it, None, f"<think>x</think>...\nANSWER: {it.data['gold']}").score == 1.0


def test_math_benchmarks():
    b, items = load("gsm8k")
    it = items[0]
    assert b.messages(it, None)[0]["content"].endswith("put your final answer within \\boxed{}.")
    assert b.score(it, None, f"<think>x</think>\\boxed{{{it.data['gold']}}}").score == 1.0
    assert b.score(it, None, "<think>x</think>\\boxed{-1}").score == 0.0
    b, items = load("math500")
    assert b.score(items[0], None, f"<think>x</think>$\\boxed{{{items[0].data['gold']}}}$").score == 1.0
    b, items = load("aime25")
    assert "\f" not in items[1].data["problem"] and "\\frac" in items[1].data["problem"]  # repaired
    assert b.samples == 16
    assert b.messages(items[0], None)[0]["role"] == "system"
    assert b.score(items[0], None, "<think>x</think>\\boxed{70}").score == 1.0


def test_mathbench_circular_evaluation():
    b, items = load("mathbench")
    choice = next(i for i in items if "options" in i.data)
    assert b.variants_for(choice) == T.CIRCULAR
    golds = {}
    for v in T.CIRCULAR:
        text = b.messages(choice, v)[0]["content"]
        assert "Therefore, the correct answer is option X" in text
        opts, gold = T.rotate_options(choice.data["options"], choice.data["gold"], v)
        assert opts[" ABCD".index(gold) - 1] == "$2x$"
        golds[v] = gold
    assert len(set(golds.values())) == 4  # the right option moves through every position
    scores = {(0, v): b.score(choice, v, f"<think>x</think>Therefore, the correct answer is option {g}").score
              for v, g in golds.items()}
    assert b.item_score(choice, scores, 1) == 1.0
    scores[(0, "CDAB")] = 0.0
    assert b.item_score(choice, scores, 1) == 0.0  # one wrong rotation fails the item
    cloze = next(i for i in items if "options" not in i.data)
    assert b.score(cloze, None, "<think>x</think>\\boxed{7}").score == 1.0
    assert b.score(cloze, None, "<think>x</think>The answer is 8.").score == 0.0


def test_avg_at_k_item_score():
    b = T.get_benchmark("aime24")
    it = T.Item("x", {})
    assert b.item_score(it, {(s, None): float(s % 4 == 0) for s in range(16)}, 16) == 0.25


def test_code_benchmarks_score_in_the_sandbox(monkeypatch):
    import gzip

    monkeypatch.setattr(T.MBPP, "timeout_s", 2.0)

    b, items = load("humaneval")
    canon = {r["task_id"]: r for r in map(json.loads, gzip.open(FIX / "humaneval/HumanEval.jsonl.gz", "rt"))}
    it = items[0]
    good = "<think>x</think>```python\n" + canon[it.id]["prompt"] + canon[it.id]["canonical_solution"] + "```"
    assert b.score(it, None, good).score == 1.0
    wrong = "<think>x</think>```python\ndef has_close_elements(n, t):\n    return None\n```"
    assert b.score(it, None, wrong).score == 0
    b, items = load("mbpp")
    assert [i.id for i in items] == ["11", "12", "17"]  # task 2 is not in the test split
    ref = {str(r["task_id"]): r["code"] for r in json.loads((FIX / "mbpp/sanitized-mbpp.json").read_text())}
    assert "Your code should pass these tests:\n\nassert " in b.messages(items[0], None)[0]["content"]
    assert b.score(items[0], None, f"<think>x</think>```python\n{ref['11']}\n```").score == 1.0
    assert b.score(items[0], None, "<think>x</think>```python\nwhile True: pass\n```").score == 0.0
    b, items = load("lcb_v6")
    assert len(b.tests(items[0])) == 3  # public + private
    sys_msg, user = b.messages(items[0], None)
    assert sys_msg["role"] == "system" and "Read the inputs from stdin" in user["content"]
    assert "class Solution" in b.messages(items[1], None)[1]["content"]
    assert b.score(items[0], None, "```python\na, b = map(int, input().split())\nprint(a + b)\n```").score == 1.0
    sol = ("```python\nclass Solution:\n    def twoSum(self, nums, target):\n        for i in range(len(nums)):\n"
           "            for j in range(i + 1, len(nums)):\n                if nums[i] + nums[j] == target:\n"
           "                    return [i, j]\n```")
    assert b.score(items[1], None, sol).score == 1.0
    assert b.score(items[1], None, "no code").score == 0.0


def test_lcb_private_tests_refuse_pickled_objects():
    tests = [{"input": "1\n", "output": "1\n"}]
    ok = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    assert T.decode_lcb_tests(ok) == tests

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(pickle.UnpicklingError):
        T.decode_lcb_tests(evil)
    assert T.decode_lcb_tests(json.dumps(tests)) == tests
    assert T._NoGlobalsUnpickler(io.BytesIO(pickle.dumps("x"))).load() == "x"


def test_ifeval_prompt_level_strict(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("punkt")
    monkeypatch.setenv("IDLM_NLTK_DATA", str(tmp_path / "nltk_data"))
    b, items = load("ifeval")
    by_ids = {tuple(i.data["ids"]): i for i in items}
    it = items[0]
    res = b.score(it, None, "<think>I will, use commas</think>")
    assert res.score == 0.0 and set(res.details) >= {"prompt_strict", "inst_strict", "prompt_loose", "inst_loose"}
    assert by_ids  # the fixture holds several instruction kinds
    from idlm.eval.ifeval import check_instructions

    ok = check_instructions("p", ["punctuation:no_comma"], [{}], "no commas here at all")
    assert ok["prompt_strict"] and ok["inst_strict"] == [True]
    bad = check_instructions("p", ["punctuation:no_comma", "change_case:english_lowercase"], [{}, {}], "Hi, There")
    assert not bad["prompt_strict"] and bad["inst_strict"] == [False, False]
    words = check_instructions("p", ["length_constraints:number_sentences"],
                               [{"relation": "less than", "num_sentences": 3}], "It is Dr. Who. Yes.")
    assert words["prompt_strict"]  # punkt: "Dr." does not end a sentence
    loose = check_instructions("p", ["startend:end_checker"], [{"end_phrase": "Is there anything else?"}],
                               "Answer.\n**Is there anything else?**")
    assert not loose["prompt_strict"] and loose["prompt_loose"]


def test_suites_and_names():
    names, over = T.resolve_suite("paper15")
    assert len(names) == 14 and names[0] == "arc_c" and names[-1] == "ifeval"
    assert T.resolve_suite("GSM8K, MATH-500,gsm8k")[0] == ["gsm8k", "math500"]
    assert T.canonical_name("LiveCodeBench-v6") == "lcb_v6"
    assert T.canonical_name("GPQA-Diamond") == "gpqa_diamond"
    with pytest.raises(UserError, match="unknown benchmark"):
        T.resolve_suite("gsm8k,nope")
    yaml_names, yaml_over = T.resolve_suite(str(ROOT / "configs/eval/paper15.yaml"))
    assert yaml_names == names
    assert yaml_over["aime24"]["samples"] == 16


def test_a_repeated_option_is_right_under_either_letter():
    # MMLU as released has a few items whose gold text appears twice (e.g. options A and B the same)
    b = T.get_benchmark("mmlu")
    it = T.Item("x", {"question": "q", "options": ["same", "same", "other", "more"], "gold": "A"})
    assert b.score(it, None, "<think>x</think>The answer is (B)").score == 1.0
    assert b.score(it, None, "<think>x</think>The answer is (A)").score == 1.0
    assert b.score(it, None, "<think>x</think>The answer is (C)").score == 0.0
    assert T.repeated_options(["a", "b ", "c", "b"]) == [("B", "D")]
