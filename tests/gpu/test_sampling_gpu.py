"""GPU: the sampled ISD step on CUDA. `process_logits` at a real vocabulary (the top-k pass and the full sort agree
with float64 on the CPU), and the SGLang stepper's sampled steps against the exact AR distribution (G test)."""

from __future__ import annotations

import pytest
import torch

from idlm.sampling import BatchHints, process_logits
from tests.isd_helpers import bigram_stepper_samples, g_test

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_process_logits_on_cuda_matches_float64_cpu():
    """Qwen3's vocabulary, 64 requests x 7 rows, the paper's protocol (T 1.0, top-p 0.95, top-k 50) beside
    greedy and top-p-only rows: the kept sets are the same and the probabilities agree to float32 rounding."""
    gen = torch.Generator().manual_seed(0)
    batch, rows, vocab = 64, 7, 151936
    logits = (torch.randn(batch, rows, vocab, generator=gen) * 4).to(torch.bfloat16).float()  # bf16 ties included
    temp = torch.ones(batch, dtype=torch.float64)
    top_k, top_p = torch.full((batch,), 50), torch.full((batch,), 0.95, dtype=torch.float64)
    for label, (t, k, p) in {"paper": (temp, top_k, top_p),
                             "mixed": (temp.clone().index_fill_(0, torch.tensor([3]), 0.0),
                                       top_k.clone().index_fill_(0, torch.tensor([5]), 0), top_p)}.items():
        want = process_logits(logits.double(), t, k, p)
        hints = BatchHints.of(t.tolist(), k.tolist(), p.tolist(), vocab)
        got = process_logits(logits.cuda(), t.cuda(), k.cuda(), p.cuda(), hints).cpu()
        # the same number of tokens kept, with the same probabilities; which of the tokens tied at the k-th place
        # (bf16 logits tie) stays may differ between the CPU's and the GPU's topk
        assert torch.equal((got > 0).sum(-1), (want > 0).sum(-1)), label
        top_got, top_want = got.double().sort(-1, descending=True).values, want.sort(-1, descending=True).values
        torch.testing.assert_close(top_got[..., :64], top_want[..., :64], rtol=1e-4, atol=1e-6, msg=label)
        untied = (want > 0) & (got > 0)
        torch.testing.assert_close(got.double()[untied], want[untied], rtol=1e-4, atol=1e-6, msg=label)


@pytest.mark.parametrize("mode", ["argmax", "sample"])
def test_sampled_steps_follow_the_ar_distribution_on_cuda(mode):
    samples, exact = bigram_stepper_samples("cuda", mode, 200_000)
    p_value, df = g_test(exact, samples)
    assert df > 50 and p_value > 1e-3, (p_value, df)
