"""idlm.sampling: logit processing against a naive per-row reference, inverse-CDF sampling."""

from __future__ import annotations

import pytest
import torch

from idlm.sampling import BatchHints, normalize, process_logits, sample_from_probs


def naive_process(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row, written the obvious way (SGLang's joint rule): temperature, softmax, then most likely first keep a
    token when it is among the first top_k and the mass of the tokens before it is at most top_p; renormalise.
    (Random float64 logits have no ties, so the order among tied tokens does not matter here.)"""
    vocab = logits.shape[0]
    if temperature <= 0 or top_k == 1:
        out = torch.zeros(vocab, dtype=torch.float64)
        out[int(logits.argmax())] = 1.0
        return out
    probs = torch.softmax(logits.double() / temperature, -1)
    kept, mass = torch.zeros_like(probs), 0.0
    for rank, i in enumerate(sorted(range(vocab), key=lambda i: -probs[i].item())):
        if (0 < top_k < vocab and rank >= top_k) or (top_p < 1 and mass > top_p):
            break
        kept[i], mass = probs[i], mass + probs[i].item()
    return kept / kept.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_matches_naive_rows(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, slots, vocab = 6, 3, 11
    logits = torch.randn(batch, slots, vocab, generator=gen, dtype=torch.float64) * 2
    temperature = torch.tensor([1.0, 0.5, 0.0, 2.0, 0.7, 1.0], dtype=torch.float64)
    top_k = torch.tensor([0, 3, 5, 4, 1, 11])
    top_p = torch.tensor([1.0, 0.8, 0.5, 0.6, 0.9, 0.3], dtype=torch.float64)
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


def test_top_k_and_top_p_filter_one_distribution():
    """SGLang's joint rule, where it differs from top-p on the renormalised top-k: with k = 3 and top_p = 0.6 the
    third token's mass before it is 0.55 <= 0.6 (kept), while after renormalising the top 3 it would be 0.73."""
    probs = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.06, 0.04]], dtype=torch.float64)
    got = process_logits(probs.log(), 1.0, 3, 0.6)
    torch.testing.assert_close(got, torch.tensor([[0.4, 1 / 3, 0.8 / 3, 0, 0, 0]], dtype=torch.float64))
    # top_p alone: the mass before the third is 0.55 <= 0.6, before the fourth 0.75 > 0.6
    torch.testing.assert_close(process_logits(probs.log(), 1.0, 0, 0.6), got)
    # a tie at the k-th place: exactly k stay, the most likely and one of the tied
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    kept = process_logits(tied, 1.0, 2, 1.0)[0]
    assert kept[0] > 0 and int((kept[1:3] > 0).sum()) == 1 and kept[3] == 0
    torch.testing.assert_close(kept.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_top_k_pass_equals_full_sort():
    """A batch whose rows all have top-k takes the top-k pass; beside a top-p row without top-k it takes the full
    sort. The rows' distributions are the same either way."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 2, 50, generator=gen, dtype=torch.float64) * 3
    temp = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    top_k, top_p = torch.tensor([5, 20, 0]), torch.tensor([0.9, 0.95, 0.8], dtype=torch.float64)
    hints = BatchHints.of(temp.tolist(), top_k.tolist(), top_p.tolist(), 50)
    assert hints.max_top_k == 50  # the last row forces the full sort
    together = process_logits(logits, temp, top_k, top_p, hints)
    narrow = BatchHints.of(temp[:2].tolist(), top_k[:2].tolist(), top_p[:2].tolist(), 50)
    assert narrow.max_top_k == 20
    alone = process_logits(logits[:2], temp[:2], top_k[:2], top_p[:2], narrow)
    torch.testing.assert_close(alone, together[:2], rtol=0, atol=1e-15)


def test_same_distribution_as_sglang_sampler():
    """SGLang's own torch sampler (`top_k_top_p_min_p_sampling_from_probs_torch`, its source from the pinned wheel)
    draws from the distribution `process_logits` returns: rows with top-k and top-p both set, 200k draws each."""
    import ast

    from tests.sglang_source import MISSING_REASON, read_source, source_root

    root = source_root()
    if root is None:
        pytest.skip(MISSING_REASON)
    tree = ast.parse(read_source(root, "srt/layers/sampler.py"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name == "top_k_top_p_min_p_sampling_from_probs_torch")
    scope: dict = {"torch": torch, "Optional": __import__("typing").Optional}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "sglang/srt/layers/sampler.py", "exec"), scope)
    sglang_sample = scope[fn.name]

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 12, generator=gen, dtype=torch.float64) * 1.5
    temp = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64)
    top_k, top_p = torch.tensor([4, 8, 12]), torch.tensor([0.7, 0.9, 0.6], dtype=torch.float64)
    ours = process_logits(logits, temp, top_k, top_p)
    n = 200_000
    for row in range(3):
        probs = torch.softmax(logits[row] / temp[row], -1).float().expand(n, -1).contiguous()
        ids = sglang_sample(probs, top_k[row].expand(n), top_p[row].float().expand(n), torch.zeros(n), False,
                            None, None)
        freq = torch.bincount(ids.long(), minlength=12).double() / n
        want = ours[row]
        assert bool(((freq > 0) == (want > 0)).all()), (row, freq, want)
        stderr = (want * (1 - want) / n).sqrt().clamp(min=1 / n)
        assert bool(((freq - want).abs() <= 5 * stderr).all()), (row, freq, want)


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
