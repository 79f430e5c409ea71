"""GPU + SGLang: ISD served by SGLang 0.5.15 equals the reference engine and SGLang's own AR decoding (greedy, same
weights), honours sampled requests, and survives bad requests and disconnects. Skipped without CUDA or sglang.

Slow (two server start-ups, 2-3 minutes each). scripts/dev/sglang_gpu_check.sh runs the same checks plus the
throughput comparison in one call; see docs/serving.md.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang (serve extra)")]

from idlm.inference.sglang_isd.testing import (  # noqa: E402
    SGLangServer,
    build_random_gated_lora,
    build_tiny_idlm,
    decode_tpf,
    generate,
    isd_flags,
    output_ids,
    random_prompts,
)

FLAGS = ["--mem-fraction-static", "0.8", "--max-total-tokens", "60000", "--max-running-requests", "32",
         "--cuda-graph-max-bs", "32", "--dtype", "bfloat16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_idlm(tmp_path_factory.mktemp("sglang_isd"), stride=4, train_steps=300)


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    logs = tmp_path_factory.mktemp("sglang_logs")
    ckpt, _ = tiny
    isd = SGLangServer("isd", str(ckpt), 30021, isd_flags(4) + FLAGS, logs / "isd.log").start()
    isd.wait_ready(400)  # one at a time: concurrent memory profiling is not needed here
    ar = SGLangServer("ar", str(ckpt), 30022, FLAGS, logs / "ar.log").start()
    try:
        ar.wait_ready(400)
        yield isd, ar
    finally:
        isd.stop()
        ar.stop()


def test_greedy_isd_equals_reference_and_ar(tiny, servers):
    from idlm.inference.engine import ISDEngine, SamplingParams

    ckpt, _ = tiny
    isd, ar = servers
    prompts = random_prompts(50, 10, 380, 4, 40, seed=1)
    engine = ISDEngine.from_pretrained(str(ckpt), stride=4, device="cuda", dtype="bfloat16", max_batch_size=16)
    ref = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=48))]
    got_res = generate(isd.url, prompts, 48)
    got = [output_ids(r) for r in got_res]
    ar_out = [output_ids(r) for r in generate(ar.url, prompts, 48)]
    assert sum(g == w for g, w in zip(got, ref)) >= 48, "SGLang ISD differs from the reference engine on > 2 of 50"
    assert sum(g == w for g, w in zip(got, ar_out)) >= 48, "SGLang ISD differs from SGLang AR on > 2 of 50"
    tpfs = [decode_tpf(r) for r in got_res]
    assert all(t is not None and 1.0 <= t <= 4.0 for t in tpfs)


def test_sampled_bad_and_disconnect(servers):
    import httpx

    isd, _ = servers
    res = generate(isd.url, [[11, 12, 13]] * 4, 24, temperature=0.8, top_p=0.9, top_k=50)
    assert all(len(output_ids(r)) == 24 for r in res)
    r = httpx.post(f"{isd.url}/generate", json={"input_ids": [5, 3], "sampling_params": {"top_p": 2.0}},
                   timeout=60, trust_env=False)
    assert 400 <= r.status_code < 500
    with httpx.stream("POST", f"{isd.url}/generate", json={"input_ids": [5, 6, 7], "stream": True,
                      "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}, timeout=60,
                      trust_env=False) as resp:
        for _ in resp.iter_lines():
            break
    assert len(output_ids(generate(isd.url, [[9, 8, 7]], 8)[0])) == 8 and isd.alive()


def test_sampled_outputs_with_a_stop_token_follow_ar(servers):
    """Sampled ISD at the paper's protocol, through the whole server, with a stop token that ends most outputs
    early: the lengths and the first two tokens have AR's distribution. Tokens after a stop that lands inside a
    multi-token step must go, and nothing else may change (the other sampled GPU tests run with ignore_eos)."""
    from collections import Counter

    from tests.isd_helpers import g_test_two_sample

    isd, ar = servers
    prompt, n = [11, 12, 13], 1500
    paper = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}
    probe = [output_ids(r) for r in generate(ar.url, [prompt] * 200, 16, **paper)]
    stop = Counter(t for ids in probe for t in ids[2:]).most_common(1)[0][0]  # a token the model emits often
    params = {**paper, "ignore_eos": False, "stop_token_ids": [stop]}
    got = [output_ids(r) for r in generate(isd.url, [prompt] * n, 24, **params)]
    want = [output_ids(r) for r in generate(ar.url, [prompt] * n, 24, **params)]
    stopped = sum(len(ids) < 24 for ids in want)
    assert stopped > n // 4, f"the stop token {stop} ends only {stopped} of {n} AR outputs early"
    for ids in got:  # nothing after the stop token
        assert stop not in ids[:-1], ids
    p_len, df_len = g_test_two_sample([len(x) for x in got], [len(x) for x in want])
    p_head, df_head = g_test_two_sample([tuple(x[:2]) for x in got], [tuple(x[:2]) for x in want])
    assert df_len >= 5 and df_head >= 3
    assert p_len > 1e-3, f"output lengths differ from AR's: G test p = {p_len:.2e} over {df_len} dof"
    assert p_head > 1e-3, f"first two tokens differ from AR's: G test p = {p_head:.2e} over {df_head} dof"


def test_risd_equals_base_ar(tiny, servers, tmp_path_factory):
    """R-ISD under SGLang: the same weights served as a base model with a random gated LoRA on the MASK rows."""
    import json

    ckpt, _ = tiny
    _, ar = servers
    adapter = build_random_gated_lora(ckpt, tmp_path_factory.mktemp("gated_lora"), stride=4)
    env = {"IDLM_ISD_CONFIG": json.dumps({"stride": 4, "lora": str(adapter)})}
    logs = tmp_path_factory.mktemp("risd_logs")
    risd = SGLangServer("risd", str(ckpt), 30023, isd_flags(4) + FLAGS, logs / "risd.log", env=env).start()
    try:
        risd.wait_ready(400)
        prompts = random_prompts(50, 10, 380, 4, 40, seed=2)
        got = [output_ids(r) for r in generate(risd.url, prompts, 48)]
        want = [output_ids(r) for r in generate(ar.url, prompts, 48)]
        assert sum(g == w for g, w in zip(got, want)) >= 48, "SGLang R-ISD differs from SGLang AR on > 2 of 50"
    finally:
        risd.stop()
