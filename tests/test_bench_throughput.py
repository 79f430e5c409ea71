"""`idlm bench throughput` against the real reference server (`idlm serve --engine native` internals on loopback,
a tiny checkpoint, real HTTP streaming), plus the parsing and summary formulas on canned events."""

from __future__ import annotations

import json

import pytest

from idlm.cli import main
from idlm.errors import UserError
from idlm.eval.tables import throughput_entries, throughput_table
from idlm.eval.throughput import RequestRecord, check_loopback, parse_event, summarize
from tests.test_server import idlm_dir, server  # noqa: F401  (module-scoped fixtures: tiny checkpoint, live server)


def test_bench_against_native_server(server, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bench" / "native.json"
    rc = main(["bench", "throughput", "--base-url", server.url, "--concurrency", "1,3", "--input-len", "6",
               "--output-len", "5", "--num-prompts", "4", "--token-range", "10,200", "--output", str(out)])
    assert rc == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["format"] == "idlm-bench-throughput"
    assert (result["engine"], result["algorithm"], result["model"]) == ("native", "isd", "tiny-idlm")
    assert [e["concurrency"] for e in result["results"]] == [1, 3]
    for e in result["results"]:
        assert e["errors"] == 0 and e["num_requests"] == 4
        assert e["completion_tokens"] == 4 * 5  # ignore_eos: every request generates exactly --output-len
        for key in ("tok_s_total", "tok_s_per_req", "tok_s_per_req_decode", "ttft_ms", "step_ms", "tpf"):
            assert e[key] > 0, key
        assert 1.0 <= e["tpf"] <= 3.0  # the checkpoint's stride is 3
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    entries = throughput_entries(result, str(out))  # `idlm tables` reads it
    assert len(entries) == 2 and entries[0]["engine"] == "native"
    assert "| native isd" in throughput_table(entries)[0]


def test_bench_sends_sampling_settings(server, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sampled.json"
    rc = main(["bench", "throughput", "--base-url", server.url, "--concurrency", "2", "--input-len", "6",
               "--output-len", "5", "--num-prompts", "2", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20",
               "--no-plot", "--output", str(out)])
    assert rc == 0, capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 20}
    assert result["results"][0]["errors"] == 0 and result["results"][0]["completion_tokens"] == 10
    for bad in (["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "0"]):
        assert main(["bench", "throughput", "--base-url", server.url, *bad, "--output", str(tmp_path / "z")]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().err


def test_bench_refuses_remote_and_dead_servers(tmp_path, capsys):
    with pytest.raises(UserError, match="loopback"):
        check_loopback("http://example.com:8000")
    assert check_loopback("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert main(["bench", "throughput", "--base-url", "http://10.1.2.3:8000", "--output", str(tmp_path / "x")]) == 2
    assert main(["bench", "throughput", "--base-url", "http://127.0.0.1:9", "--concurrency", "1",
                 "--output", str(tmp_path / "y.json")]) == 2
    assert "no server answers" in capsys.readouterr().err


def test_parse_sglang_events_and_formulas():
    rec = RequestRecord(t0=0.0)
    parse_event("sglang", {"text": "a", "meta_info": {"completion_tokens": 1}}, rec, 0.5)
    parse_event("sglang", {"meta_info": {"completion_tokens": 9, "spec_verify_ct": 4}}, rec, 2.5)
    rec.t2 = 2.5
    assert (rec.t1, rec.tokens, rec.forwards) == (0.5, 9, 4)
    ar = RequestRecord(t0=0.0, t1=1.0, t2=3.0, tokens=5)
    e = summarize([rec, ar], 2, "ar")
    # ISD request: 8 tokens after the first in 4 forwards over 2 s; AR: 4 tokens in 4 forwards over 2 s
    assert e["tpf"] == pytest.approx((2.0 + 1.0) / 2) and e["step_ms"] == pytest.approx(500.0)
    assert e["tok_s_total"] == pytest.approx(14 / 3.0)
    assert e["tok_s_per_req"] == pytest.approx((9 / 2.5 + 5 / 3.0) / 2)
    assert e["ttft_ms"] == pytest.approx(750.0)
    bad = summarize([RequestRecord(t0=0.0, t2=1.0, error="HTTP 500: boom")], 1, None)
    assert bad["errors"] == 1 and "tok_s_total" not in bad and bad["error_examples"] == ["HTTP 500: boom"]
    err = RequestRecord(t0=0.0)
    parse_event("openai", {"error": {"message": "engine died"}}, err, 0.1)
    assert err.error == "engine died"
