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


def test_block_mask_is_built_without_dense_tensor():
    """A ~16k-row block mask builds compiled within a memory budget far below a dense bool tensor."""
    L = 8192
    valid = torch.ones(1, L, dtype=torch.bool, device="cuda")
    sup = valid.clone()
    sup[:, :512] = False
    ids = torch.zeros(1, L, dtype=torch.long, device="cuda")
    labels = torch.where(sup, ids, torch.full_like(ids, -100))
    inputs = build_inputs(ids, labels, 1, 3, valid.long())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    bm = flex_block_mask(inputs.layout, inputs.noisy_index)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    dense_bytes = (inputs.num_noisy_rows + L) ** 2
    assert peak < dense_bytes / 8, (peak, dense_bytes)
    n = inputs.num_noisy_rows + L
    assert bm.shape[-2:] == (n, n)
