"""GPU: the reference ISD engine on CUDA (greedy = AR, trimmed KV cache, R-ISD, sampled distribution, bf16 smoke)."""

from __future__ import annotations

import copy

import pytest
import torch

from idlm.inference.engine import ISDEngine, SamplingParams
from idlm.lora import load_gated_lora, save_gated_lora
from tests.helpers import tiny_model
from tests.isd_helpers import exact_ar_distribution, g_test, naive_greedy

pytestmark = pytest.mark.gpu

VOCAB, MASK = 41, 40
PROMPTS = [[3], [7, 1], [2, 9, 4, 4, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19], [5] * 12]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=3).cuda()


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_greedy_equals_ar_on_cuda(model, stride):
    refs = [naive_greedy(model, p, 12) for p in PROMPTS]
    engine = ISDEngine(model, None, stride, MASK, max_batch_size=3)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert [o.token_ids for o in outs] == refs


def test_kv_cache_on_cuda(model):
    engine = ISDEngine(model, None, 3, MASK, max_batch_size=4)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=i))
           for i, p in enumerate(PROMPTS[:4])]
    for _ in range(5):
        engine.step()
        for rid in ids:
            if rid not in engine._requests:
                continue
            tokens = engine.cached_tokens(rid)
            with torch.no_grad():
                fresh = model(input_ids=torch.tensor([tokens], device="cuda"), use_cache=True).past_key_values
            for (keys, values), layer in zip(engine.request_kv(rid), fresh.layers):
                torch.testing.assert_close(keys, layer.keys[0], rtol=0, atol=1e-10)
                torch.testing.assert_close(values, layer.values[0], rtol=0, atol=1e-10)


def test_risd_on_cuda(model, tmp_path):
    save_gated_lora(model, tmp_path, stride=3, mask_token_id=MASK, rank=4, init_std=0.3)
    lora_model, _ = load_gated_lora(copy.deepcopy(model), str(tmp_path))
    refs = [naive_greedy(model, p, 12) for p in PROMPTS]
    outs = ISDEngine(lora_model, None, 3, MASK).generate(PROMPTS, SamplingParams(max_new_tokens=12))
    assert [o.token_ids for o in outs] == refs


def test_sampled_distribution_on_cuda():
    dist = tiny_model("qwen3", vocab_size=9, hidden_size=32, initializer_range=0.5, seed=0).cuda()
    exact = exact_ar_distribution(dist, [1, 2, 3], 4)
    engine = ISDEngine(dist, None, 3, 8, max_batch_size=4000)
    outs = engine.generate([[1, 2, 3]] * 4000, [SamplingParams(max_new_tokens=4, temperature=1.0, seed=i)
                                                 for i in range(4000)])
    p_value, df = g_test(exact, [tuple(o.token_ids) for o in outs])
    assert df >= 40 and p_value > 1e-3


def test_bf16_smoke():
    model = tiny_model("qwen3", vocab_size=1024, hidden_size=256, num_layers=4, dtype=torch.bfloat16,
                       initializer_range=0.05).cuda()
    engine = ISDEngine(model, None, 4, 1023, max_batch_size=8)
    prompts = [list(range(1, 1 + n)) for n in (5, 40, 17, 100)]
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=32, temperature=t, seed=1) for t in (0, 1, 0, 0.7)])
    assert all(len(o.token_ids) == 32 and o.finish_reason == "length" and o.tpf >= 1.0 for o in outs)
