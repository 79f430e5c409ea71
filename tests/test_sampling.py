"""idlm.sampling: logit processing against a naive per-row reference, inverse-CDF sampling."""

from __future__ import annotations

import pytest
import torch

from idlm.sampling import BatchHints, normalize, process_logits, sample_from_probs


def naive_process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, written the obvious way: temperature, top-k, softmax, top-p (smallest prefix reaching top_p)."""
    vocab = logits.shape[0]
    if temperature <= 0:
        out = torch.zeros(vocab, dtype=torch.float64)
        out[int(logits.argmax())] = 1.0
        return out
    x = logits.double() / temperature
    if 0 < top_k < vocab:
        kth = sorted(x.tolist(), reverse=True)[top_k - 1]
        x = torch.where(x >= kth, x, torch.tensor(float("-inf"), dtype=torch.float64))
    probs = torch.softmax(x, -1)
    if top_p < 1:
        order = sorted(range(vocab), key=lambda i: -probs[i].item())
        keep, mass = [], 0.0
        for i in order:
            keep.append(i)
            mass += probs[i].item()
            if mass >= top_p:
                break
        kept = torch.zeros(vocab, dtype=torch.float64)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return probs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_matches_naive_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, slots, vocab = 6, 3, 11
    logits = torch.randn(batch, slots, vocab, generator=gen, dtype=torch.float64) * 2
    temperature = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.7, 1.0], dtype=torch.float64)
    top_k = torch.tensor([0, 3, 5, 0, 1, 11])
    top_p = torch.tensor([1.0, 1.0, 0.5, 0.6, 0.9, 0.3], dtype=torch.float64)
    probs = process_logits(logits, temperature, top_k, top_p)
    assert probs.shape == logits.shape and probs.dtype == torch.float64
    # the CPU-side hints (no device reads) give the same distributions
    hints = BatchHints.of(temperature.tolist(), top_k.tolist(), top_p.tolist(), vocab)
    assert hints == BatchHints(any_top_k=True, max_top_k=vocab, any_top_p=True, any_greedy=True)
    assert torch.equal(process_logits(logits, temperature, top_k, top_p, hints), probs)
    for b in range(batch):
        for s in range(slots):
            want = naive_process(logits[b, s], float(temperature[b]), int(top_k[b]), float(top_p[b]))
            torch.testing.assert_close(probs[b, s], want, rtol=0, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, slots, dtype=torch.float64))


def test_batch_hints_of_python_values():
    hints = BatchHints.of([0.7, 1.0], [1 << 30, 5], [1.0, 1.0], vocab=100)
    assert hints == BatchHints(any_top_k=True, max_top_k=100, any_top_p=False, any_greedy=False)
    plain = BatchHints.of([1.0], [0], [1.0], vocab=100)
    assert not (plain.any_top_k or plain.any_top_p or plain.any_greedy) and plain.max_top_k == 100
    logits = torch.randn(2, 3, 100, dtype=torch.float64)
    for h, args in ((hints, ([0.7, 1.0], [1 << 30, 5], [1.0, 1.0])), (plain, (1.0, 0, 1.0))):
        t = [torch.as_tensor(a, dtype=torch.float64 if i != 1 else torch.long) for i, a in enumerate(args)]
        if t[0].dim() == 0:
            t = [x.expand(2) for x in t]
        assert torch.equal(process_logits(logits, *t, hints=h), process_logits(logits, *t))


def test_process_logits_scalars_and_dtypes():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]], dtype=torch.bfloat16)
    probs = process_logits(logits, 1.0)
    assert probs.dtype == torch.float32  # low-precision logits are processed in float32
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))
    greedy = process_logits(logits, 0.0, 2, 0.5)
    assert greedy.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    with pytest.raises(ValueError, match="per-request parameter"):
        process_logits(logits, torch.ones(3))


def test_top_p_keeps_the_top_token_and_off_at_one():
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0]])
    only_top = process_logits(logits, 1.0, 0, 1e-6)
    assert only_top.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    tiny = torch.tensor([[0.0, -60.0, -80.0, 3.0]])  # tail probabilities far below float32 rounding of the sum
    full = process_logits(tiny, 1.0, 0, 1.0)
    assert bool((full > 0).all())


def test_sample_from_probs_inverse_cdf():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 6)
    u = torch.tensor([0.0, 0.0999, 0.1001, 0.6999, 0.7001, 0.999999], dtype=torch.float64)
    assert sample_from_probs(probs, u).tolist() == [0, 0, 2, 2, 3, 3]
    # unnormalised rows are scaled by their total; zero-mass tokens are never returned, even for u -> 1
    weights = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0]] * 3)
    assert sample_from_probs(weights, torch.tensor([0.0, 0.5, 1.0 - 1e-16])).tolist() == [1, 3, 3]


def test_sample_from_probs_frequencies():
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.25, 0.0, 0.4, 0.3])
    n = 200_000
    draws = sample_from_probs(probs.expand(n, 5), torch.rand(n, generator=gen, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=5).double() / n
    torch.testing.assert_close(freq, probs.double(), rtol=0, atol=5e-3)
    assert int((draws == 2).sum()) == 0


def test_sample_from_probs_middle_dims():
    probs = torch.zeros(2, 3, 4)
    probs[..., 1] = 1.0
    probs[1, 2] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    out = sample_from_probs(probs, torch.full((2, 3), 0.5))
    assert out.tolist() == [[1, 1, 1], [1, 1, 3]]


def test_normalize_with_fallback():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    fb = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(normalize(w, fb), torch.tensor([[0.2, 0.3, 0.5], [0.25, 0.0, 0.75]]))
