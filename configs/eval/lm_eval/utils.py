"""lm-eval 0.4.13 glue for the idlm task configs in this directory (loaded with `--include_path`).

Data comes from idlm's loaders (the local data directory with checksum checks, else the hub), prompts and
scoring from idlm.eval.tasks, so an lm-eval run and an `idlm eval` run of the same benchmark send the same
prompts and score the same way. Only single-message, one-sample benchmarks with in-process scorers are offered
here (ARC-C, MMLU, MMLU-Pro, GPQA, GPQA-Diamond, GSM8K, MATH-500, IFEval); see docs/eval.md for why the others
(AIME avg@16, MathBench rotations, system prompts, code execution) use `idlm eval` only.

Options through lm-eval's `--metadata` JSON: data_dir (default $IDLM_DATA_DIR or ./data), verify (default true).
Do not pass `think_end_token`: the idlm scorers strip the thinking themselves, per benchmark, as the paper did.
"""

from __future__ import annotations

import json
from pathlib import Path


def dataset(bench: str, data_dir: str | None = None, verify: bool = True, **_unused):
    """A DatasetDict with one "test" split: id, prompt (the user message), item (the idlm item as JSON)."""
    import datasets

    from idlm.eval import data as D
    from idlm.eval.tasks import get_benchmark

    b = get_benchmark(bench)
    items = b.load(Path(data_dir) if data_dir else D.default_data_dir(), verify=bool(verify))
    rows = []
    for it in items:
        msgs = b.messages(it, None)
        if len(msgs) != 1 or msgs[0]["role"] != "user":
            raise ValueError(f"{bench}: needs a system prompt; use `idlm eval`")
        rows.append({"id": it.id, "prompt": msgs[0]["content"], "item": json.dumps(it.data, ensure_ascii=False)})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def doc_to_text(doc: dict) -> str:
    return doc["prompt"]


def _score(bench: str, doc: dict, results: list) -> dict:
    from idlm.eval.tasks import Item, get_benchmark

    b = get_benchmark(bench)
    s = b.score(Item(doc["id"], json.loads(doc["item"])), None, results[0] or "")
    return {"acc": float(s.score)}


def process_arc_c(doc, results):
    return _score("arc_c", doc, results)


def process_mmlu(doc, results):
    return _score("mmlu", doc, results)


def process_mmlu_pro(doc, results):
    return _score("mmlu_pro", doc, results)


def process_gpqa(doc, results):
    return _score("gpqa", doc, results)


def process_gpqa_diamond(doc, results):
    return _score("gpqa_diamond", doc, results)


def process_gsm8k(doc, results):
    return _score("gsm8k", doc, results)


def process_math500(doc, results):
    return _score("math500", doc, results)


def process_ifeval(doc, results):
    return _score("ifeval", doc, results)
