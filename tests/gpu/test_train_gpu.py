"""GPU: a bf16 training step of the objective with flex_attention through the trainer's model forward, and the
training-throughput benchmark (run on a CUDA machine; skipped on CPU)."""

from __future__ import annotations

import argparse

import pytest
import torch

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.objective import global_target_counts
from tests.helpers import random_batch, tiny_model

pytestmark = pytest.mark.gpu


def _pair(vocab: int):
    sdpa = tiny_model("qwen3", vocab, dtype=torch.bfloat16, hidden_size=256, num_layers=4).cuda()
    flex = tiny_model("qwen3", vocab, dtype=torch.bfloat16, hidden_size=256, num_layers=4).cuda()
    flex.load_state_dict(sdpa.state_dict())
    flex.set_attn_implementation("flex_attention")
    return sdpa, flex


@pytest.mark.parametrize("auto_balance", [False, True])
def test_flex_bf16_step_through_the_trainer_forward(auto_balance):
    from idlm.training.trainer import install_objective_forward

    vocab = 512
    cfg = IDLMConfig(mask_token_id=vocab - 1, stride=4,
                     objective=ObjectiveConfig(alpha=1.0 if auto_balance else 0.2, auto_balance=auto_balance))
    sdpa, flex = _pair(vocab)
    for m in (sdpa, flex):
        install_objective_forward(m, cfg)
        m.train()
    ids, labels, mask = (t.cuda() for t in random_batch([(40, 300, 0), (12, 150, 178), (100, 228, 0)], vocab, seed=1))
    n_noisy, n_clean = global_target_counts([labels])
    outs = {}
    for name, m in (("sdpa", sdpa), ("flex", flex)):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, idlm_num_noisy=n_noisy, idlm_num_clean=n_clean,
                idlm_weight=None if auto_balance else 0.2)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0
        outs[name] = (out, grads)
    (a, ga), (b, gb) = outs["sdpa"], outs["flex"]
    torch.testing.assert_close(b.loss.float(), a.loss.float(), rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(ga, gb, dim=0) > 0.99
    # a few optimizer steps on the same batch lower the loss (bf16, flex)
    opt = torch.optim.AdamW(flex.parameters(), lr=3e-3)
    first = None
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        out = flex(input_ids=ids, attention_mask=mask, labels=labels, idlm_num_noisy=n_noisy, idlm_num_clean=n_clean,
                   idlm_weight=0.2)
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss)
    assert float(out.loss) < first


def test_bench_train_on_gpu(tmp_path):
    from idlm.tiny import build_tiny_model
    from idlm.training.bench import add_bench_arguments, run_bench

    build_tiny_model(tmp_path / "m", hidden_size=256, num_layers=4, free_rows=8)
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    args = p.parse_args(["--model", str(tmp_path / "m"), "--random-init", "--mask-token-id", "390", "--seq-len", "1024",
                         "--batch-size", "2", "--steps", "2", "--warmup", "2", "--grad-ckpt"])
    rep = run_bench(args)
    assert rep["attn"] == "flex_attention" and rep["dtype"] == "bfloat16"
    res = {r["mode"]: r for r in rep["results"]}
    for r in res.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0
        if rep["peak_tflops"]:
            assert 0 < r["mfu"] < 1
    assert rep["work"]["objective"]["model_tokens"] > rep["work"]["ar"]["model_tokens"]
