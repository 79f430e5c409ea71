"""GPU: the flex_attention path of the objective equals the dense SDPA path (run on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch

from idlm.config import IDLMConfig
from idlm.masks import flex_block_mask
from idlm.objective import build_inputs, idlm_hidden_states, idlm_loss
from tests.helpers import random_batch, tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stride", [2, 4])
def test_flex_equals_sdpa(stride):
    vocab = 128
    sdpa = tiny_model("qwen3", vocab, dtype=torch.float32, hidden_size=128).cuda()
    flex = tiny_model("qwen3", vocab, dtype=torch.float32, hidden_size=128).cuda()
    flex.load_state_dict(sdpa.state_dict())
    flex.config._attn_implementation = "flex_attention"
    ids, labels, mask = random_batch([(40, 200, 0), (10, 120, 110), (100, 140, 0)], vocab, seed=0)
    ids, labels, mask = ids.cuda(), labels.cuda(), mask.cuda()
    inputs = build_inputs(ids, labels, vocab - 1, stride - 1, mask)
    with torch.no_grad():
        a = idlm_hidden_states(sdpa, inputs)
        b = idlm_hidden_states(flex, inputs)
    valid = torch.cat([inputs.noisy_index >= 0, mask.bool()], dim=1)
    torch.testing.assert_close(b[valid], a[valid], rtol=2e-4, atol=2e-4)
    cfg = IDLMConfig(mask_token_id=vocab - 1, stride=stride)
    la = idlm_loss(sdpa, ids, labels, cfg, mask).loss
    lb = idlm_loss(flex, ids, labels, cfg, mask).loss
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def _long_inputs(L: int = 8192):
    valid = torch.ones(1, L, dtype=torch.bool, device="cuda")
    sup = valid.clone()
    sup[:, :512] = False
    ids = torch.zeros(1, L, dtype=torch.long, device="cuda")
    labels = torch.where(sup, ids, torch.full_like(ids, -100))
    return build_inputs(ids, labels, 1, 3, valid.long())


def test_block_mask_is_built_without_dense_tensor():
    """A ~16k-row block mask (K + L = 15872) builds from the closed form within a memory budget far below a
    dense bool tensor (the build's work tensors are about 1 MiB each), and its tiles equal torch's."""
    from torch.nn.attention.flex_attention import create_block_mask

    from idlm.masks import flex_mask_mod

    L = 8192
    inputs = _long_inputs(L)
    flex_block_mask(inputs.layout, inputs.noisy_index)  # warm-up (vmap and allocator caches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bm = flex_block_mask(inputs.layout, inputs.noisy_index)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    n = inputs.num_noisy_rows + L
    dense_bytes = n * n
    print(f"block mask build: rows {n}, peak {peak / 2**20:.1f} MiB, dense bool {dense_bytes / 2**20:.1f} MiB")
    assert peak < dense_bytes / 16, (peak, dense_bytes)
    assert bm.shape[-2:] == (n, n)
    # correctness at this size against torch's builder (which materialises the mask; run after the measurement)
    ref = create_block_mask(flex_mask_mod(inputs.layout, inputs.noisy_index), 1, None, n, n, device="cuda")
    for got, want in ((bm.kv_num_blocks, ref.kv_num_blocks), (bm.full_kv_num_blocks, ref.full_kv_num_blocks),
                      (bm.q_num_blocks, ref.q_num_blocks), (bm.full_q_num_blocks, ref.full_q_num_blocks)):
        assert torch.equal(got, want)
    for num, got, want in ((bm.kv_num_blocks, bm.kv_indices, ref.kv_indices),
                           (bm.full_kv_num_blocks, bm.full_kv_indices, ref.full_kv_indices)):
        listed = torch.arange(got.shape[-1], device="cuda") < num[..., None]
        assert torch.equal(torch.where(listed, got, -1), torch.where(listed, want, -1))


@pytest.mark.parametrize("compact,left_pad", [(True, False), (False, True)])
def test_flex_attention_with_block_mask_equals_sdpa(compact, left_pad):
    """Compiled flex_attention with the closed-form BlockMask (FULL tiles skip the mask_mod) gives SDPA's output
    and gradients under the dense mask, on a padded batch (right or left) whose length is not a multiple of 128."""
    from torch.nn.attention.flex_attention import flex_attention

    from idlm.masks import dense_mask

    ids, labels, mask = random_batch([(40, 700, 0), (10, 450, 250), (300, 600, 0)], 128, seed=1,
                                    left_pad=left_pad)
    inputs = build_inputs(ids.cuda(), labels.cuda(), 127, 3, mask.cuda(), compact=compact)
    n = inputs.input_ids.shape[1]
    bm = flex_block_mask(inputs.layout, inputs.noisy_index)
    assert int(bm.full_kv_num_blocks.sum()) > 0 and int(bm.kv_num_blocks.sum()) > 0
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 64, device="cuda", generator=g, requires_grad=True) for _ in range(3))
    out = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    attn_mask = dense_mask(inputs.layout, inputs.noisy_index)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
