"""`idlm eval`'s runner against a scripted OpenAI-compatible server (stdlib, loopback): retries with backoff,
errors recorded (never dropped), resume without redoing finished samples, avg@k seeds, summaries."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from idlm.cli import main
from idlm.eval.runner import EvalConfig, EvalRun, read_records, sglang_isd_stats

FIX = Path(__file__).parent / "fixtures" / "eval" / "data"


class FakeServer:
    """Answers /v1/chat/completions with ``self.respond(body, n)`` -> (status, json); counts requests."""

    def __init__(self, respond):
        self.respond = respond
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.bodies.append(body)
                    n = len(outer.bodies)
                status, obj = outer.respond(body, n)
                self._send(status, obj)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(content, reasoning=None, finish="stop"):
    msg = {"role": "assistant", "content": content}
    if reasoning is not None:
        msg["reasoning_content"] = reasoning
    return 200, {"id": "chatcmpl-x", "object": "chat.completion",
                 "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
                 "idlm": {"tpf": 2.5, "forwards": 3, "acceptance": [0.9]}}


def gsm8k_gold():
    return [json.loads(line)["answer"].split("####")[-1].strip() for line in open(FIX / "gsm8k/test.jsonl")]


def cfg(url, out, **kw):
    base = dict(base_url=url, suite="gsm8k", output=str(out), data_dir=str(FIX), verify_data=False,
                concurrency=2, progress=False, retry_backoff=0.01, max_retries=2)
    base.update(kw)
    return EvalConfig(**base)


def question_index(body):
    text = body["messages"][-1]["content"]
    qs = [json.loads(line)["question"] for line in open(FIX / "gsm8k/test.jsonl")]
    return next(i for i, q in enumerate(qs) if text.startswith(q))


def test_requests_follow_the_paper_protocol_and_scores_are_right(tmp_path):
    gold = gsm8k_gold()

    def respond(body, n):
        i = question_index(body)
        ans = gold[i] if i % 2 == 0 else "-1"
        return completion(f"<think>thinking</think>So \\boxed{{{ans}}}.")

    with FakeServer(respond) as srv:
        summary = EvalRun(cfg(srv.url, tmp_path)).run()
    s = summary["benchmarks"]["gsm8k"]
    assert s["score"] == 50.0 and s["n_items"] == 4 and s["n_errors"] == 0 and s["complete"]
    assert s["mean_tpf"] == 2.5 and s["pooled_tpf"] == 2.5 and s["paper"]["I-DLM-8B"] == 95.0
    body = srv.bodies[0]
    assert body["model"] == "fake-model"  # from /v1/models
    assert (body["temperature"], body["top_p"], body["top_k"], body["max_tokens"]) == (1.0, 0.95, 50, 32768)
    assert "chat_template_kwargs" not in body  # thinking stays on (the template's default)
    recs = read_records(tmp_path / "gsm8k/samples.jsonl")
    assert len(recs) == 4
    r = recs["gsm8k/0#0"]
    assert r["prompt"][0]["role"] == "user" and r["response"].startswith("<think>")
    assert r["extracted"] == gold[0] and r["score"] == 1.0 and r["usage"]["completion_tokens"] == 7
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["gsm8k"]["score"] == 50.0


def test_failed_requests_are_retried_then_recorded_as_errors(tmp_path):
    gold = gsm8k_gold()
    attempts: dict[int, int] = {}

    def respond(body, n):
        i = question_index(body)
        attempts[i] = attempts.get(i, 0) + 1
        if i == 0 and attempts[i] <= 2:
            return 503, {"error": {"message": "busy"}}  # recovers on the third attempt
        if i == 1:
            return 500, {"error": {"message": "engine crashed"}}  # never recovers
        if i == 2:
            return 400, {"error": {"message": "prompt too long"}}  # not retried
        if i == 3 and attempts[i] == 1:
            return 200, {"choices": []}  # malformed, retried
        return completion(f"<think>x</think>\\boxed{{{gold[i]}}}")

    with FakeServer(respond) as srv:
        summary = EvalRun(cfg(srv.url, tmp_path, max_retries=2)).run()
    assert attempts == {0: 3, 1: 3, 2: 1, 3: 2}
    s = summary["benchmarks"]["gsm8k"]
    assert s["n_errors"] == 2 and s["n_items"] == 4 and s["score"] == 50.0  # errors stay in the denominator
    recs = read_records(tmp_path / "gsm8k/samples.jsonl")
    assert "HTTP 500" in recs["gsm8k/1#0"]["error"] and recs["gsm8k/1#0"]["attempts"] == 3
    assert "HTTP 400" in recs["gsm8k/2#0"]["error"] and recs["gsm8k/2#0"]["attempts"] == 1
    assert recs["gsm8k/0#0"]["score"] == 1.0 and recs["gsm8k/0#0"]["attempts"] == 3

    # a rerun retries only the errored samples
    def healthy(body, n):
        return completion(f"<think>x</think>\\boxed{{{gold[question_index(body)]}}}")

    with FakeServer(healthy) as srv2:
        summary = EvalRun(cfg(srv2.url, tmp_path)).run()
    assert sorted(question_index(b) for b in srv2.bodies) == [1, 2]
    assert summary["benchmarks"]["gsm8k"]["score"] == 100.0 and summary["benchmarks"]["gsm8k"]["n_errors"] == 0
    assert len((tmp_path / "gsm8k/samples.jsonl").read_text().splitlines()) == 4  # compacted


def test_unreachable_server_records_errors_and_does_not_hang(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here
    summary = EvalRun(cfg(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=1, model="m", limit=2)).run()
    g = summary["benchmarks"]["gsm8k"]
    assert g["n_errors"] == 2 and g["score"] == 0.0
    rec = read_records(tmp_path / "gsm8k/samples.jsonl")["gsm8k/0#0"]
    assert rec["attempts"] == 2 and "Connect" in rec["error"]


def test_resume_skips_finished_samples_and_rescoring_only(tmp_path):
    gold = gsm8k_gold()
    with FakeServer(lambda b, n: completion(f"<think>x</think>\\boxed{{{gold[question_index(b)]}}}")) as srv:
        EvalRun(cfg(srv.url, tmp_path, limit=2)).run()
        assert len(srv.bodies) == 2
        # simulate a kill: a torn last line, and a sample generated but not scored yet
        path = tmp_path / "gsm8k/samples.jsonl"
        recs = read_records(path)
        unscored = {**recs["gsm8k/1#0"], "score": None}
        with open(path, "a") as f:
            f.write(json.dumps(unscored) + "\n")
            f.write('{"key": "gsm8k/2#0", "respo')
        summary = EvalRun(cfg(srv.url, tmp_path, limit=4)).run()
        assert sorted(question_index(b) for b in srv.bodies[2:]) == [2, 3]  # 0 done, 1 only re-scored
    assert summary["benchmarks"]["gsm8k"]["score"] == 100.0
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["invocations"]) == 2


def test_avg_at_k_sends_distinct_seeds_and_averages(tmp_path):
    def respond(body, n):
        good = body["seed"] % 2 == 0
        return completion("<think>x</think>\\boxed{" + ("70" if good else "1") + "}")

    with FakeServer(respond) as srv:
        summary = EvalRun(cfg(srv.url, tmp_path, suite="aime25", limit=1, samples=4)).run()
    seeds = [b["seed"] for b in srv.bodies]
    assert len(seeds) == 4 and len(set(seeds)) == 4
    assert srv.bodies[0]["messages"][0]["role"] == "system"
    s = summary["benchmarks"]["aime25"]
    assert s["samples_per_item"] == 4 and s["score"] == 100.0 * sum(x % 2 == 0 for x in seeds) / 4


def test_reasoning_returned_separately_is_put_back(tmp_path):
    gold = gsm8k_gold()

    def respond(body, n):
        return completion(f"\\boxed{{{gold[question_index(body)]}}}", reasoning="let me think \\boxed{0}")

    with FakeServer(respond) as srv:
        summary = EvalRun(cfg(srv.url, tmp_path, limit=1, thinking=False, max_tokens=64)).run()
    assert srv.bodies[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert srv.bodies[0]["max_tokens"] == 64
    rec = read_records(tmp_path / "gsm8k/samples.jsonl")["gsm8k/0#0"]
    assert rec["response"].startswith("<think>let me think") and rec["reasoning_separate"]
    assert summary["benchmarks"]["gsm8k"]["score"] == 100.0


def test_sglang_meta_info_gives_tokens_per_forward(tmp_path):
    """SGLang returns no idlm block; with return_meta_info its spec_verify_ct gives the same statistic: tokens after
    the prefill's first / decode forwards, pooled over a benchmark by forwards."""
    assert sglang_isd_stats({"meta_info": {"completion_tokens": 9, "spec_verify_ct": 4}}) == {"tpf": 2.0, "forwards": 4}
    assert sglang_isd_stats({"meta_info": {"completion_tokens": 9}}) is None  # AR server: no speculative counts
    assert sglang_isd_stats({}) is None
    lens = {0: (9, 4), 1: (31, 6)}  # tpf 2.0 over 4 forwards, 5.0 over 6: pooled 38 / 10 = 3.8, mean 3.5

    def respond(body, n):
        status, data = completion("\\boxed{1}")
        del data["idlm"]
        toks, ct = lens[question_index(body)]
        data["choices"][0]["meta_info"] = {"completion_tokens": toks, "spec_verify_ct": ct}
        return status, data

    with FakeServer(respond) as srv:
        s = EvalRun(cfg(srv.url, tmp_path, limit=2, extra_body={"return_meta_info": True})).run()["benchmarks"]["gsm8k"]
    assert all(b["return_meta_info"] is True for b in srv.bodies)
    assert s["mean_tpf"] == 3.5 and s["pooled_tpf"] == 3.8


def test_cli_eval_and_errors(tmp_path, capsys):
    gold = gsm8k_gold()
    with FakeServer(lambda b, n: completion(f"<think>x</think>\\boxed{{{gold[question_index(b)]}}}")) as srv:
        rc = main(["eval", "--base-url", srv.url, "--suite", "gsm8k", "--limit", "2", "--output", str(tmp_path),
                   "--data-dir", str(FIX), "--no-verify-data", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GSM8K" in out and "100.0" in out
    assert main(["eval", "--base-url", "http://127.0.0.1:9/v1", "--suite", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["eval", "--suite", "gsm8k"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--base-url", "x", "--limit", "abc"])


def test_missing_data_stops_or_is_skipped(tmp_path, monkeypatch):
    import shutil

    from idlm.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    shutil.copytree(FIX / "gsm8k", data / "gsm8k")
    gold = gsm8k_gold()
    with FakeServer(lambda b, n: completion(f"<think>x</think>\\boxed{{{gold[question_index(b)]}}}")) as srv:
        with pytest.raises(UserError, match="--skip-missing"):
            EvalRun(cfg(srv.url, tmp_path / "a", suite="gsm8k,mmlu", data_dir=str(data), limit=1)).run()
        assert srv.bodies == []  # nothing is sent before every benchmark's data is there
        summary = EvalRun(cfg(srv.url, tmp_path / "b", suite="gsm8k,mmlu", data_dir=str(data), limit=1,
                              skip_missing=True)).run()
    assert summary["benchmarks"]["gsm8k"]["score"] == 100.0
    assert summary["benchmarks"]["mmlu"]["score"] is None and "mmlu" in summary["benchmarks"]["mmlu"]["skipped"]
    from idlm.eval.tables import load_results, quality_table

    text, _ = quality_table(load_results([tmp_path / "b"])[0])
    assert "| MMLU | skipped (no data) |" in text


def test_truncated_answers_are_shown_by_the_cli(tmp_path, capsys):
    gold = gsm8k_gold()

    def respond(body, n):
        i = question_index(body)
        return completion(f"<think>x</think>\\boxed{{{gold[i]}}}", finish="length" if i < 2 else "stop")

    with FakeServer(respond) as srv:
        rc = main(["eval", "--base-url", srv.url, "--suite", "gsm8k", "--output", str(tmp_path),
                   "--data-dir", str(FIX), "--no-verify-data", "--no-progress"])
    assert rc == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "GSM8K" in x)
    assert "2 truncated" in line, line
    assert json.loads((tmp_path / "gsm8k/summary.json").read_text())["n_truncated"] == 2


def test_two_runs_into_one_output_directory_are_refused(tmp_path, capsys):
    import os

    gold = gsm8k_gold()
    release = threading.Event()
    started = threading.Event()

    def respond(body, n):
        started.set()
        release.wait(20)  # hold the first run in flight
        return completion(f"<think>x</think>\\boxed{{{gold[question_index(body)]}}}")

    with FakeServer(respond) as srv:
        first: dict = {}
        t = threading.Thread(target=lambda: first.setdefault("summary", EvalRun(cfg(srv.url, tmp_path, limit=1)).run()))
        t.start()
        try:
            assert started.wait(20)
            from idlm.errors import UserError

            with pytest.raises(UserError) as e:
                EvalRun(cfg(srv.url, tmp_path, limit=2)).run()
            msg = str(e.value)
            assert str(tmp_path) in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
            rc = main(["eval", "--base-url", srv.url, "--suite", "gsm8k", "--output", str(tmp_path),
                       "--data-dir", str(FIX), "--no-verify-data", "--no-progress", "--model", "m"])
            assert rc == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "another `idlm eval`" in err[0]
        finally:
            release.set()
            t.join(30)
    assert first["summary"]["benchmarks"]["gsm8k"]["score"] == 100.0
    assert len(srv.bodies) == 1  # the refused runs sent nothing
    with FakeServer(lambda b, n: completion(f"<think>x</think>\\boxed{{{gold[question_index(b)]}}}")) as srv2:
        assert EvalRun(cfg(srv2.url, tmp_path, limit=2)).run()["benchmarks"]["gsm8k"]["n_items"] == 2  # freed
