"""scripts/dev/serving_table.py, the real-weight serving table's driver, through the same code on the reference
engine: real `idlm serve` processes on loopback, one after another, `idlm bench throughput` on chat-encoded GSM8K
prompts under both protocols, and the table with speed-ups and the TPF x step-ratio prediction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_idlm_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/dev/serving_table.py"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_idlm_checkpoint(tmp_path_factory.mktemp("table"), stride=2)


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_table_on_the_native_engine(ckpt, tmp_path):
    pytest.importorskip("uvicorn")
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i}. How many?",
                                       "answer": f"#### {2 * i}"}) + "\n" for i in range(5)))
    out = tmp_path / "table"
    r = _run("--base", ckpt, "--converted", ckpt, "--out", str(out), "--engine", "native", "--stride", "2",
             "--concurrency", "1,2", "--output-len", "6", "--gsm8k", str(gsm), "--num-prompts", "3",
             "--startup-timeout", "300")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 3 and all(p["input_ids"] for p in prompts)
    summary = json.loads((out / "serving_table.json").read_text())
    assert summary["systems"] == ["ar", "isd"] and set(summary["table"]) == {"greedy", "paper"}
    for protocol in ("greedy", "paper"):
        bench = {s: json.loads((out / f"{s}-{protocol}.json").read_text()) for s in ("ar", "isd")}
        assert bench["isd"]["stop_at_eos"] is True
        assert bench["isd"]["sampling"]["temperature"] == (0.0 if protocol == "greedy" else 1.0)
        for c in ("1", "2"):  # JSON keys
            row = summary["table"][protocol][c]
            assert row["ar"]["errors"] == 0 and row["isd"]["errors"] == 0
            assert row["ar"]["tpf"] == pytest.approx(1.0)  # --stride 1: one token per forward
            assert 1.0 <= row["isd"]["tpf"] <= 2.0
            assert row["isd"]["speedup"] == pytest.approx(row["isd"]["tok_s_per_req"] / row["ar"]["tok_s_per_req"])
            assert row["isd"]["predicted"] == pytest.approx(
                row["isd"]["tpf"] * row["ar"]["step_ms"] / row["isd"]["step_ms"])
    text = (out / "table.md").read_text()
    assert "### greedy" in text and "### paper" in text and "pred." in text
    assert (out / "serve-ar.log").is_file() and (out / "serve-isd.log").is_file()


def test_bad_requests_are_refused_before_anything_starts(ckpt, tmp_path):
    r = _run("--base", ckpt, "--converted", ckpt, "--out", str(tmp_path / "x"), "--engine", "native",
             "--systems", "ar,ngram", timeout=120)
    assert r.returncode != 0 and "ngram is SGLang's" in r.stderr
    r = _run("--base", ckpt, "--converted", ckpt, "--out", str(tmp_path / "y"), "--systems", "r-isd", timeout=120)
    assert r.returncode != 0 and "r-isd needs --adapter" in r.stderr
    r = _run("--base", ckpt, "--converted", ckpt, "--out", str(tmp_path / "z"), "--protocols", "greedy,warm",
             timeout=120)
    assert r.returncode != 0 and "unknown protocol" in r.stderr
    assert not (tmp_path / "x").exists()
