"""The lm-eval 0.4.13 path (configs/eval/lm_eval, custom task configs over idlm's local data and scorers) sends the
same prompts and gets the same scores as `idlm eval`, offline, against a scripted server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idlm.eval.runner import EvalConfig, EvalRun

from .test_eval_runner import FakeServer, completion, gsm8k_gold, question_index

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"
ROOT = Path(__file__).resolve().parents[1]


def test_lm_eval_task_configs_match_idlm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's [api] extra (local-chat-completions)
    gold = gsm8k_gold()

    def respond(body, n):
        i = question_index(body)
        return completion(f"<think>x, 3</think>\\boxed{{{gold[i] if i % 2 == 0 else -5}}}")

    with FakeServer(respond) as srv:
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-chat-completions", "--model_args",
               f"base_url={srv.url}/chat/completions,model=fake,num_concurrent=2,tokenized_requests=False,"
               "max_retries=1", "--apply_chat_template", "--include_path", str(ROOT / "configs/eval/lm_eval"),
               "--tasks", "idlm_gsm8k", "--limit", "4", "--metadata",
               json.dumps({"data_dir": str(FIX), "verify": False}), "--output_path", str(tmp_path / "lm")]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        lm_bodies = list(srv.bodies)
        summary = EvalRun(EvalConfig(base_url=srv.url, suite="gsm8k", output=str(tmp_path / "idlm"),
                                     data_dir=str(FIX), verify_data=False, limit=4, progress=False)).run()
    results = next((tmp_path / "lm").rglob("results_*.json"))
    acc = json.loads(results.read_text())["results"]["idlm_gsm8k"]["acc,none"]
    assert acc == pytest.approx(0.5)
    assert summary["benchmarks"]["gsm8k"]["score"] == pytest.approx(100 * acc)
    idlm_bodies = srv.bodies[len(lm_bodies):]
    prompts = lambda bodies: sorted(b["messages"][-1]["content"] for b in bodies)  # noqa: E731
    assert prompts(lm_bodies) == prompts(idlm_bodies)
    for b in lm_bodies:
        assert (b["temperature"], b["top_p"], b["top_k"], b["max_tokens"], b["stop"]) == (1.0, 0.95, 50, 32768, [])
