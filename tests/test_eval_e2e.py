"""End to end: `idlm eval` against the reference engine's real OpenAI-compatible server (a tiny I-DLM built offline,
loopback), two benchmarks with --limit; the run is killed mid-way and resumed (finished samples are not redone);
then `idlm tables` writes the quality table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from idlm.eval.runner import read_records

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"
ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny-idlm"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from idlm.convert import convert
    from idlm.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("eval_base")
    build_tiny_model(base, arch="qwen3", free_rows=8, seed=0)
    out = tmp_path_factory.mktemp("eval_idlm") / MODEL_NAME
    convert(base=str(base), output=str(out), stride=3)
    return out


@pytest.fixture(scope="module")
def server(ckpt):
    pytest.importorskip("uvicorn")
    import uvicorn

    from idlm.inference.engine import ISDEngine
    from idlm.inference.runner import EngineRunner
    from idlm.inference.server import bind_socket, create_app, server_url

    engine = ISDEngine.from_pretrained(str(ckpt), max_batch_size=4)
    runner = EngineRunner(engine).start()
    app = create_app(runner, MODEL_NAME)
    posts: list[str] = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.method == "POST":
            posts.append(request.url.path)
        return await call_next(request)

    sock = bind_socket("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start"
    try:
        yield server_url(sock) + "/v1", posts
    finally:
        uv.should_exit = True
        thread.join(15)
        runner.stop()
        sock.close()


def _eval_cmd(url: str, out: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from idlm.cli import main; sys.exit(main())", "eval",
            "--base-url", url, "--suite", "gsm8k,mbpp", "--limit", "4", "--max-tokens", "24", "--concurrency", "1",
            "--output", str(out), "--data-dir", str(FIX), "--no-verify-data", "--request-timeout", "60",
            "--max-retries", "1", "--retry-backoff", "0.1"]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TQDM_MININTERVAL="0")
    return env


def _finished(out: Path) -> dict[str, dict]:
    recs = {}
    for b in ("gsm8k", "mbpp"):
        recs.update(read_records(out / b / "samples.jsonl"))
    return recs


def test_eval_against_the_real_server_resumes_after_a_kill(server, tmp_path):
    url, posts = server
    out = tmp_path / "run"
    total = 4 + 3  # MBPP's fixture has 3 test-split items

    proc = subprocess.Popen(_eval_cmd(url, out), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(1 for r in _finished(out).values() if r.get("response") is not None) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(0.5)  # a request the client sent just before the kill reaches the server's counter first
    first = _finished(out)
    generated = {k: r for k, r in first.items() if r.get("response") is not None and not r.get("error")}
    assert 2 <= len(generated) < total, "killed mid-way"
    assert not (out / "summary.json").exists()
    posts_before = len(posts)

    done = subprocess.run(_eval_cmd(url, out), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    new_requests = len(posts) - posts_before
    assert new_requests == total - len(generated)  # finished samples were not redone
    final = _finished(out)
    assert len(final) == total
    for k, r in generated.items():
        assert final[k]["response_id"] == r["response_id"] and final[k]["response"] == r["response"]
    for r in final.values():
        assert r["error"] is None and r["score"] is not None, r
        assert {"prompt", "response", "extracted", "score"} <= set(r)
    assert "GSM8K" in done.stderr and "sample" in done.stderr  # the progress bars (tqdm on stderr)
    assert "GSM8K" in done.stdout and "MBPP" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == MODEL_NAME
    for b in ("gsm8k", "mbpp"):
        s = summary["benchmarks"][b]
        assert s["complete"] and s["n_errors"] == 0 and s["n_items"] == (4 if b == "gsm8k" else 3)
        assert 0.0 <= s["score"] <= 100.0
        assert s["mean_tpf"] is not None and s["mean_tpf"] >= 1.0  # the native server's ISD statistics
    mbpp = read_records(out / "mbpp" / "samples.jsonl")
    assert all("status" in r["details"] for r in mbpp.values())  # ran in the sandbox

    tables = tmp_path / "tables"
    r = subprocess.run([sys.executable, "-c", "import sys; from idlm.cli import main; sys.exit(main())", "tables",
                        str(out), "--output", str(tables)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    text = (tables / "quality.md").read_text()
    assert f"| Benchmark | {MODEL_NAME} | I-DLM-8B (paper) | Qwen3-8B (paper) |" in text
    assert "| GSM8K |" in text and "| MBPP |" in text and "95.0 | 96.0" in text


def test_reproduce_tables_script_serves_evaluates_and_writes_tables(ckpt, tmp_path):
    idlm = Path(sys.executable).with_name("idlm")
    if not idlm.exists():
        pytest.skip("the idlm console script is not installed next to this Python")
    out = tmp_path / "repro"
    env = dict(_env(), IDLM=str(idlm), SUITE="gsm8k", LIMIT="2", MAX_TOKENS="8", CONCURRENCY="2",
               DATA_DIR=str(FIX), EVAL_ARGS="--no-verify-data --no-progress", SERVER_WAIT="240",
               THROUGHPUT_ARGS="--concurrency 1,2 --input-len 4 --output-len 4 --num-prompts 2 --token-range 10,200")
    r = subprocess.run(["bash", str(ROOT / "scripts/reproduce_tables.sh"), str(ckpt), str(out)], env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "throughput sweep" in r.stderr
    bench = json.loads((out / "throughput" / "throughput.json").read_text())
    assert [e["concurrency"] for e in bench["results"]] == [1, 2] and bench["engine"] == "native"
    assert "| native isd" in (out / "tables" / "throughput.md").read_text()
    text = (out / "tables" / "quality.md").read_text()
    gsm8k = json.loads((out / "eval" / "summary.json").read_text())["benchmarks"]["gsm8k"]
    assert gsm8k["n_items"] == 2
    trunc = f", {gsm8k['n_truncated']} trunc" if gsm8k["n_truncated"] else ""  # MAX_TOKENS=8 cuts answers off
    assert "| GSM8K |" in text and f"(n=2{trunc})" in text
    assert "stopping the server" in r.stderr
