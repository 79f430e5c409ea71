"""`idlm tables`: the quality table next to the paper's numbers, the throughput table and plots (tolerant input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm.cli import main
from idlm.eval.tables import (
    load_results,
    quality_table,
    score_difference,
    throughput_entries,
    throughput_table,
    write_tables,
)


def eval_dir(root: Path, model: str, scores: dict, **extra) -> Path:
    d = root / model
    d.mkdir(parents=True)
    benches = {k: {"benchmark": k, "display": k, "score": v, "n_items": 10, "samples_per_item": 1, "n_errors": 0,
                   "n_missing": 0, "complete": True, **extra} for k, v in scores.items()}
    (d / "summary.json").write_text(json.dumps({"model": model, "benchmarks": benches}))
    return d


def test_quality_table_side_by_side(tmp_path):
    a = eval_dir(tmp_path, "mine", {"gsm8k": 91.25, "math500": 80.0, "aime24": 50.0})
    b = eval_dir(tmp_path, "other", {"gsm8k": 90.0}, limit=10)
    runs, tput = load_results([a, b])
    assert [r["label"] for r in runs] == ["mine", "other"] and tput == []
    text, data = quality_table(runs)
    lines = text.splitlines()
    assert lines[0] == "| Benchmark | mine | other | I-DLM-8B (paper) | Qwen3-8B (paper) |"
    gsm = next(line for line in lines if line.startswith("| GSM8K"))
    assert gsm == "| GSM8K | 91.2 | 90.0 (n=10) | 95.0 | 96.0 |"
    assert any(line.startswith("| MATH-500 | 80.0 | - | 96.8 | 95.8 |") for line in lines)
    assert "AIME-24" in text and "n=K" in text
    assert [d["benchmark"] for d in data] == ["gsm8k", "math500", "aime24"]


THROUGHPUT = {
    "format": "idlm-bench-throughput", "engine": "native", "algorithm": "isd", "stride": 4, "dataset": "math500",
    "results": [
        {"concurrency": 1, "tok_s_total": 300.0, "tok_s_per_req": 300.0, "step_ms": 12.5, "ttft_ms": 40.0, "tpf": 2.9},
        {"concurrency": 32, "tok_s_total": 6000.0, "tok_s_per_req": 187.5, "tpf": 2.96},
        {"concurrency": 64, "tok_s_per_req": 120.0, "algorithm": "isd"},  # fields missing: shown as "-"
        {"no_concurrency": True},  # ignored
    ],
}


def test_throughput_entries_are_tolerant():
    e = throughput_entries(THROUGHPUT, "x.json")
    assert len(e) == 3 and e[1]["engine"] == "native" and e[1]["stride"] == 4
    assert throughput_entries([{"concurrency": 8, "engine": "sglang"}])[0]["engine"] == "sglang"
    assert throughput_entries({"concurrency": 2})[0]["concurrency"] == 2
    assert throughput_entries({"something": "else"}) == []
    text, rows = throughput_table(e)
    assert "| native isd N=4 math500 | native | isd | 4 | 64 | - | 120.0 | - | - | - |" in text
    assert "186-193" in text  # the paper's range at C=32
    assert "| native isd N=4 math500 | 187.5 | 120.0 |" in text


def test_write_tables_and_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ev = eval_dir(tmp_path / "runs", "mine", {"ifeval": 80.0})
    tdir = tmp_path / "tput"
    tdir.mkdir()
    (tdir / "sweep.json").write_text(json.dumps(THROUGHPUT))
    (tdir / "broken.json").write_text("{not json")
    out = tmp_path / "tables"
    assert main(["tables", str(ev), str(tdir), "--output", str(out), "--print"]) == 0
    for name in ("quality.md", "throughput.md", "throughput_per_request.png", "throughput_total.png", "tables.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "throughput_per_request.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| IFEval | 80.0 | 84.7 | 84.7 |" in printed
    assert main(["tables", str(tmp_path / "nothing-here")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tables", str(empty)]) == 2
    res = write_tables([str(tdir)], tmp_path / "only_tput")
    assert res["quality"] == [] and len(res["throughput"]) == 3


def test_truncated_answers_are_flagged_in_the_table(tmp_path):
    d = eval_dir(tmp_path, "mine", {"gsm8k": 91.25, "math500": 80.0}, n_truncated=0)
    s = json.loads((d / "summary.json").read_text())
    s["benchmarks"]["gsm8k"]["n_truncated"] = 3
    (d / "summary.json").write_text(json.dumps(s))
    text, _ = quality_table(load_results([d])[0])
    assert "| GSM8K | 91.2 (3 trunc) | 95.0 | 96.0 |" in text
    assert "| MATH-500 | 80.0 | 96.8 | 95.8 |" in text
    assert "trunc: answers cut off at max_tokens" in text


def test_score_difference_is_agresti_caffo():
    # 90/541 against 64/541 (IFEval prompt-level, a base and its conversion): by hand, a1 = 91/543, a2 = 65/543
    ref = {"score": 100 * 90 / 541, "n_items": 541}
    other = {"score": 100 * 64 / 541, "n_items": 541}
    diff, lo, hi = score_difference(ref, other)
    a1, a2 = 91 / 543, 65 / 543
    half = 1.96 * ((a1 * (1 - a1) + a2 * (1 - a2)) / 543) ** 0.5
    assert diff == pytest.approx(100 * (64 - 90) / 541)
    assert (lo, hi) == (pytest.approx(100 * (a2 - a1 - half)), pytest.approx(100 * (a2 - a1 + half)))
    assert hi < 0  # this drop is outside the noise
    # two zero scores: the plain normal interval would be the point 0; this one is not
    zero = {"score": 0.0, "n_items": 30}
    d0, lo0, hi0 = score_difference(zero, zero)
    assert d0 == 0 and lo0 < -5 and hi0 > 5 and lo0 == pytest.approx(-hi0)
    assert score_difference({"score": 50.0}, other) is None  # no item count
    assert score_difference({"score": 50.0, "n_items": 0}, other) is None


def test_tables_diff_column(tmp_path, capsys):
    base = eval_dir(tmp_path, "base", {"gsm8k": 50.0, "ifeval": 20.0}, sampling={"thinking": False})
    conv = eval_dir(tmp_path, "conv", {"gsm8k": 40.0}, sampling={"thinking": False})
    assert main(["tables", str(base), str(conv), "--diff", "--output", str(tmp_path / "t"), "--print"]) == 0
    out = capsys.readouterr().out
    assert "thinking off" in out
    header = next(line for line in out.splitlines() if line.startswith("| Benchmark"))
    assert header == "| Benchmark | base | conv | conv - base (95%) | I-DLM-8B (paper) | Qwen3-8B (paper) |"
    gsm = next(line for line in out.splitlines() if line.startswith("| GSM8K"))
    lo, hi = score_difference({"score": 50.0, "n_items": 10}, {"score": 40.0, "n_items": 10})[1:]
    assert gsm == f"| GSM8K | 50.0 | 40.0 | -10.0 [{lo:+.1f}, {hi:+.1f}] | 95.0 | 96.0 |"
    ifeval = next(line for line in out.splitlines() if line.startswith("| IFEval"))
    assert ifeval == "| IFEval | 20.0 | - | - | 84.7 | 84.7 |"  # no second score, no difference
    data = json.loads((tmp_path / "t" / "tables.json").read_text())["quality"]
    assert data[0]["diff"]["conv"]["difference"] == pytest.approx(-10.0)
    # without --diff the table is as before
    assert main(["tables", str(base), str(conv), "--output", str(tmp_path / "u"), "--print"]) == 0
    assert " - base (95%)" not in capsys.readouterr().out
