"""idlm.isd: step layout, verification rules (exactness of one step), bookkeeping and statistics."""

from __future__ import annotations

import pytest
import torch

from idlm.isd import (
    ISDStats,
    build_step,
    check_draft_mode,
    gather_rows,
    max_step_rows,
    next_num_drafts,
    num_step_rows,
    propose_drafts,
    rows_to_keep,
    step_tokens,
    verify_drafts,
    verify_greedy,
    verify_point_drafts,
)

MASK = 99


def test_build_step_steady_and_cold():
    pending = torch.tensor([5, 6])
    drafts = torch.tensor([[11, 12, 13], [21, 22, 23]])
    num_drafts = torch.tensor([3, 0])  # request 1 is a cold start
    committed = torch.tensor([10, 4])
    step = build_step(pending, drafts, num_drafts, committed, stride=4, mask_token_id=MASK)
    assert step.input_ids.tolist() == [
        [5, 11, 12, 13, MASK, MASK, MASK],
        [6, MASK, MASK, MASK, MASK, MASK, MASK],  # 4 rows needed, padded with MASK to 7
    ]
    assert step.position_ids.tolist() == [list(range(10, 17)), list(range(4, 11))]
    assert step.mask_rows.tolist() == [[False] * 4 + [True] * 3, [False] + [True] * 6]
    assert step.num_rows.tolist() == [7, 4]
    # row j verifies draft j + 1; row k gives the token after the drafts (repeated beyond k)
    assert step.verify_rows.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    # MASK rows right after the last real row give the next drafts
    assert step.draft_rows.tolist() == [[4, 5, 6], [1, 2, 3]]
    assert max_step_rows(4) == 7 and num_step_rows(num_drafts, 4).tolist() == [7, 4]


def test_build_step_all_cold_is_narrow_and_stride_one_is_ar():
    step = build_step(torch.tensor([1, 2]), torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 0]),
                      torch.tensor([3, 3]), stride=3, mask_token_id=MASK)
    assert step.input_ids.tolist() == [[1, MASK, MASK], [2, MASK, MASK]]
    wide = build_step(torch.tensor([1]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
                      stride=3, mask_token_id=MASK, num_rows=5)
    assert wide.input_ids.tolist() == [[1, MASK, MASK, MASK, MASK]]
    ar = build_step(torch.tensor([7, 8]), torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 0]),
                    torch.tensor([2, 9]), stride=1, mask_token_id=None)
    assert ar.input_ids.tolist() == [[7], [8]] and ar.position_ids.tolist() == [[2], [9]]
    assert ar.verify_rows.tolist() == [[0], [0]] and ar.draft_rows.shape == (2, 0)
    with pytest.raises(ValueError, match="mask token"):
        build_step(torch.tensor([1]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), 3,
                   None)
    with pytest.raises(ValueError, match="num_rows"):
        build_step(torch.tensor([1]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]), torch.tensor([0]), 3,
                   MASK, num_rows=3)


def test_gather_rows():
    values = torch.arange(2 * 4 * 3).view(2, 4, 3)
    out = gather_rows(values, torch.tensor([[3, 0], [1, 1]]))
    assert out.tolist() == [[values[0, 3].tolist(), values[0, 0].tolist()], [values[1, 1].tolist()] * 2]


def test_verify_greedy():
    p_argmax = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7]])
    drafts = torch.tensor([[4, 5, 6], [4, 9, 6], [1, 5, 6], [4, 5, 6]])
    num_drafts = torch.tensor([3, 3, 3, 0])
    accepted, nxt = verify_greedy(p_argmax, drafts, num_drafts)
    assert accepted.tolist() == [3, 1, 0, 0]
    assert nxt.tolist() == [7, 5, 4, 4]  # bonus, correction, correction, cold-start token


def _onehot(ids, vocab):
    return torch.nn.functional.one_hot(torch.tensor(ids), vocab).double()


@pytest.mark.parametrize("mode", ["sample", "argmax", "paper_argmax"])
def test_verify_drafts_one_hot_equals_greedy(mode):
    """Temperature 0 makes p and q one-hot: every rule then is greedy verification, whatever the uniforms."""
    gen = torch.Generator().manual_seed(0)
    vocab, batch, k = 7, 64, 3
    p_ids = torch.randint(0, 3, (batch, k + 1), generator=gen)
    drafts = torch.randint(0, 3, (batch, k), generator=gen)
    num_drafts = torch.randint(0, k + 1, (batch,), generator=gen)
    p = _onehot(p_ids.tolist(), vocab)
    q = _onehot(drafts.tolist(), vocab)
    accepted, nxt = verify_drafts(p, q, drafts, num_drafts, torch.rand(batch, k, generator=gen),
                                  torch.rand(batch, generator=gen), mode)
    want_acc, want_next = verify_greedy(p_ids, drafts, num_drafts)
    assert accepted.tolist() == want_acc.tolist() and nxt.tolist() == want_next.tolist()


def test_verify_drafts_ratio_rule_cases():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]] * 3, dtype=torch.float64)
    q = torch.tensor([[[0.2, 0.6, 0.2]]] * 3, dtype=torch.float64)
    drafts = torch.tensor([[1], [1], [0]])
    num_drafts = torch.tensor([1, 1, 1])
    # draft 1 has p/q = 0.5: accepted iff u < 0.5; draft 0 has p/q = 2.5: always accepted
    accepted, nxt = verify_drafts(p, q, drafts, num_drafts, torch.tensor([[0.49], [0.51], [0.99]]),
                                  torch.tensor([0.0, 0.0, 0.95]), "sample")
    assert accepted.tolist() == [1, 0, 1]
    # accepted: bonus from p row 1 ([.1, .1, .8]); rejected: residual max(0, p - q) = [.3, 0, 0] -> token 0
    assert nxt.tolist() == [0, 0, 2]


def test_verify_drafts_zero_mass_residual_falls_back_to_p():
    # q dominates p everywhere (unnormalised, as rounding can make it): the residual is empty -> sample from p
    p = torch.tensor([[[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[[0.5, 0.5, 0.5]]], dtype=torch.float64)
    accepted, nxt = verify_drafts(p, q, torch.tensor([[0]]), torch.tensor([1]), torch.tensor([[0.9]]),
                                  torch.tensor([0.6]), "sample")
    assert accepted.tolist() == [0] and nxt.tolist() == [2]


def test_verify_drafts_argmax_rule_cases():
    p = torch.tensor([[[0.5, 0.3, 0.2], [0.0, 1.0, 0.0]]] * 2, dtype=torch.float64)
    drafts = torch.tensor([[0], [0]])
    accepted, nxt = verify_drafts(p, None, drafts, torch.tensor([1, 1]), torch.tensor([[0.4], [0.6]]),
                                  torch.tensor([0.5, 0.5]), "argmax")
    assert accepted.tolist() == [1, 0]
    # accepted: bonus from p row 1 -> 1; rejected: p without the draft, [0, .6, .4] -> u = .5 gives token 1
    assert nxt.tolist() == [1, 1]
    with pytest.raises(ValueError, match="q_probs"):
        verify_drafts(p, None, drafts, torch.tensor([1, 1]), torch.zeros(2, 1), torch.zeros(2), "sample")
    # cold starts need no q in any mode
    accepted, nxt = verify_drafts(p, None, drafts, torch.tensor([0, 0]), torch.zeros(2, 1), torch.zeros(2), "sample")
    assert accepted.tolist() == [0, 0] and nxt.tolist() == [0, 0]


def _first_two_tokens(mode: str, n: int, seed: int = 0):
    """Empirical distribution of the first two emitted tokens of one verify step with fixed p rows and q."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor([[0.45, 0.05, 0.3, 0.2, 0.0], [0.1, 0.2, 0.1, 0.2, 0.4], [0.2] * 5], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.6, 0.1, 0.1, 0.0], [0.05, 0.05, 0.1, 0.3, 0.5]], dtype=torch.float64)
    p_b, q_b = p.expand(n, 3, 5), q.expand(n, 2, 5)
    drafts = propose_drafts(q_b, torch.rand(n, 2, generator=gen, dtype=torch.float64), mode)
    accepted, nxt = verify_drafts(p_b, q_b, drafts, torch.full((n,), 2), torch.rand(n, 2, generator=gen),
                                  torch.rand(n, generator=gen, dtype=torch.float64), mode)
    tokens = step_tokens(drafts, accepted, nxt)
    has_second = accepted >= 1
    return tokens[:, 0], tokens[has_second, 1], p


def _assert_follows(samples: torch.Tensor, probs: torch.Tensor) -> None:
    """Empirical frequencies within 5 standard errors of ``probs`` (a fixed seed keeps this deterministic)."""
    n = samples.numel()
    freq = torch.bincount(samples, minlength=probs.numel()).double() / n
    stderr = (probs * (1 - probs) / n).sqrt().clamp(min=1 / n)
    assert bool(((freq - probs).abs() <= 5 * stderr).all()), (freq, probs)


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_verify_step_is_exact(mode):
    """Each emitted token follows p: the first one p[0]; after an accepted draft 1, the next one p[1]."""
    first, second, p = _first_two_tokens(mode, 400_000)
    assert second.numel() > 10_000
    _assert_follows(first, p[0])
    _assert_follows(second, p[1])


def test_paper_argmax_rule_is_biased():
    first, _, p = _first_two_tokens("paper_argmax", 400_000)
    freq = torch.bincount(first, minlength=5).double() / first.numel()
    # the argmax draft (token 1, q = 0.6, p = 0.05) is emitted with prob min(1, p/q) = 1/12, not 0.05
    assert abs(freq[1].item() - 1 / 12) < 3e-3
    with pytest.raises(AssertionError):
        _assert_follows(first, p[0])


def test_propose_drafts_modes():
    q = torch.tensor([[[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]])
    u = torch.tensor([[0.05, 0.95]], dtype=torch.float64)
    assert propose_drafts(q, u, "sample").tolist() == [[0, 2]]
    assert propose_drafts(q, u, "argmax").tolist() == [[1, 0]]
    assert propose_drafts(q, u, ["paper_argmax"]).tolist() == [[1, 0]]
    assert propose_drafts(torch.zeros(1, 0, 3), torch.zeros(1, 0), "sample").shape == (1, 0)
    with pytest.raises(ValueError, match="draft mode"):
        check_draft_mode("greedy")


def test_bookkeeping_helpers():
    drafts = torch.tensor([[4, 5, 6], [4, 5, 6], [0, 0, 0]])
    accepted = torch.tensor([3, 1, 0])
    nxt = torch.tensor([7, 9, 8])
    num_drafts = torch.tensor([3, 3, 0])
    tokens = step_tokens(drafts, accepted, nxt)
    assert [row[:a + 1] for row, a in zip(tokens.tolist(), accepted.tolist())] == [[4, 5, 6, 7], [4, 9], [8]]
    assert rows_to_keep(accepted).tolist() == [4, 2, 1]
    assert next_num_drafts(num_drafts, accepted, 4).tolist() == [3, 0, 3]
    assert next_num_drafts(torch.tensor([0]), torch.tensor([0]), 1).tolist() == [0]


def test_stats():
    stats = ISDStats(stride=4)
    assert stats.tpf == 0.0 and stats.acceptance == [0.0, 0.0, 0.0]
    stats.record_prefill(1)
    stats.record_step(num_drafts=0, accepted_len=0, emitted=1)  # cold start
    stats.record_step(num_drafts=3, accepted_len=3, emitted=4)
    stats.record_step(num_drafts=3, accepted_len=1, emitted=2)
    stats.record_step(num_drafts=3, accepted_len=0, emitted=1)
    assert stats.emitted == 9 and stats.forwards == 4 and stats.tpf == 8 / 4
    assert stats.attempted == [3, 2, 1] and stats.accepted == [2, 1, 1]
    assert stats.acceptance == [2 / 3, 0.5, 1.0]
    assert stats.rejections == 2 and stats.cold_starts == 1
    total = ISDStats(stride=4)
    total.merge(stats)
    total.merge(stats)
    assert total.emitted == 18 and total.attempted == [6, 4, 2]
    assert ISDStats(stride=1).acceptance == []


def test_verify_point_drafts_is_the_dense_rule_on_candidates():
    """The sparse point rule accepts exactly as `verify_drafts(..., "argmax")` does for the same uniforms, and its
    next token follows the same distribution (the correction p without x, or the bonus row)."""
    from idlm.sampling import candidate_probs, process_logits

    gen = torch.Generator().manual_seed(5)
    batch, k, vocab = 6, 3, 30
    logits = torch.randn(batch, k + 1, vocab, generator=gen, dtype=torch.float64) * 2
    temp = torch.tensor([1.0, 0.7, 1.0, 0.0, 1.3, 1.0], dtype=torch.float64)
    top_k, top_p = torch.tensor([5, 8, 3, 1, 10, 6]), torch.tensor([0.9, 1.0, 0.8, 1.0, 0.95, 0.7], dtype=torch.float64)
    ids, sparse = candidate_probs(logits, temp, top_k, top_p)
    dense = process_logits(logits, temp, top_k, top_p)
    torch.testing.assert_close(torch.zeros_like(dense).scatter_(-1, ids, sparse), dense)
    assert ids.shape[-1] == 10 and bool((sparse[..., :-1] >= sparse[..., 1:]).all())  # most likely first
    drafts = dense[:, :k].argmax(-1)
    drafts[1, 0] = int(dense[1, 0].argmin())  # a draft p rejects for sure
    num = torch.tensor([3, 3, 2, 3, 0, 1])
    n = 20_000
    rep = lambda t: t.repeat_interleave(n, 0)  # noqa: E731
    ua = torch.rand(batch * n, k, generator=gen, dtype=torch.float64)
    us = torch.rand(batch * n, generator=gen, dtype=torch.float64)
    acc_s, nxt_s = verify_point_drafts(rep(ids), rep(sparse), rep(drafts), rep(num), ua, us)
    acc_d, nxt_d = verify_drafts(rep(dense), None, rep(drafts), rep(num), ua, us, "argmax")
    assert torch.equal(acc_s, acc_d)
    assert int(acc_s[n:2 * n].max()) == 0 and int((acc_s < rep(num)).sum()) > 1000
    for b in range(batch):  # per request and accepted length: the next token follows the rule's distribution
        sel = slice(b * n, (b + 1) * n)
        for a in range(int(num[b]) + 1):
            rows = acc_s[sel] == a
            if int(rows.sum()) < 500:
                continue
            want = dense[b, a].clone()
            if a < int(num[b]):  # draft a + 1 rejected: p without it
                want[drafts[b, a]] = 0.0
                want = want / want.sum()
            _assert_follows(nxt_s[sel][rows], want)
