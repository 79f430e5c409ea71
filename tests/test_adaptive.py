"""idlm.adaptive: tokens per forward of the ISD chain, the step-cost table, the load-adaptive choice of N."""

from __future__ import annotations

import pytest

from idlm.adaptive import AdaptiveStride, StepCostTable, best_stride, tokens_per_forward


def _chain_tpf(acceptance: list[float], stride: int, steps: int = 200_000) -> float:
    """Tokens per forward of the warm/cold chain, by following its expected transitions step by step."""
    warm, tokens = 0.0, 0.0  # probability of being warm, accumulated expected tokens
    for _ in range(steps):
        run, emitted_warm = 1.0, 1.0
        for k in range(stride - 1):
            run *= acceptance[k]
            emitted_warm += run
        tokens += warm * emitted_warm + (1 - warm) * 1.0
        warm = warm * run + (1 - warm)  # warm stays warm only if all accepted; cold always warms up
    return tokens / steps


@pytest.mark.parametrize("acceptance", [[0.8, 0.7, 0.6], [0.5, 0.5, 0.5], [0.95, 0.9, 0.9], [0.0, 0.0, 0.0]])
def test_tokens_per_forward_is_the_chains(acceptance):
    for n in (1, 2, 3, 4):
        assert tokens_per_forward(acceptance, n) == pytest.approx(_chain_tpf(acceptance, n), rel=1e-3)
    assert tokens_per_forward(acceptance, 1) == 1.0
    # every draft accepted: N tokens per forward
    assert tokens_per_forward([1.0, 1.0, 1.0], 4) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        tokens_per_forward(acceptance, 0)


def _table(per_row_ms: float = 0.0) -> StepCostTable:
    """A GPU-like curve: flat while memory-bound, then growing with the rows in flight (batch x rows)."""
    batches, rows = (1, 8, 32, 128), (1, 3, 5, 7)
    return StepCostTable(batches, rows, tuple(tuple(1e-3 * (6.0 + max(0.0, b * r - 64) * 0.05 + per_row_ms * r)
                                                    for r in rows) for b in batches))


def test_step_cost_table_interpolates_and_checks():
    t = _table()
    assert t(1, 7) == t.seconds[0][3] and t(0, 1) == t.seconds[0][0]
    assert t(20, 5) == pytest.approx((t.seconds[1][2] + t.seconds[2][2]) / 2)
    assert t(256, 3) == pytest.approx(2 * t.seconds[3][1])
    with pytest.raises(KeyError, match="rows"):
        t(4, 2)
    with pytest.raises(ValueError, match="ascending"):
        StepCostTable((8, 1), (1,), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="positive"):
        StepCostTable((1,), (1,), ((0.0,),))
    assert StepCostTable.from_json(t.to_json()) == t


def test_best_stride_follows_the_load():
    t, acc = _table(), [0.8, 0.7, 0.6]
    assert best_stride(acc, t, 1, 4) == 4  # memory-bound: the extra rows are free
    assert best_stride(acc, t, 128, 4) == 1  # compute-bound: 7 rows cost ~7x, AR wins
    chosen = [best_stride(acc, t, b, 4) for b in (1, 8, 16, 32, 64, 128)]
    assert chosen == sorted(chosen, reverse=True)  # more load, never a larger N
    assert best_stride([0.0, 0.0, 0.0], t, 1, 4) == 1  # drafts never accepted: AR (ties go to the smaller N)
    for b in (1, 8, 32, 128):  # the chosen N's rate is never below AR's
        n = best_stride(acc, t, b, 4)
        assert tokens_per_forward(acc, n) / t(b, 2 * n - 1) >= 1 / t(b, 1)


def test_adaptive_stride_learns_acceptance():
    policy = AdaptiveStride(4, _table(), memory=10)
    assert policy.acceptance == [0.5, 0.5, 0.5]
    for _ in range(100):
        policy.observe([10, 9, 8], [9, 8, 2])
    acc = policy.acceptance
    assert acc[0] == pytest.approx(0.9, abs=0.01) and acc[2] == pytest.approx(0.25, abs=0.01)
    policy.observe([10], [0])  # a stride-2 step: only position 1 moves
    assert policy.acceptance[2] == acc[2] and policy.acceptance[0] < acc[0]
    assert policy.choose(1) >= 2 and policy.chosen
    with pytest.raises(ValueError, match="lacks rows"):
        AdaptiveStride(5, _table())


def test_measured_step_times_correct_the_table():
    """A table that underestimates the 7-row step: once steps at N = 4 measure 1.6x the table, N = 3 wins."""
    rows = (1, 3, 5, 7)
    table = StepCostTable((1,), rows, ((1.0, 1.02, 1.04, 1.06),))
    policy = AdaptiveStride(4, table)
    for _ in range(50):
        policy.observe([10, 10, 10], [9, 8, 7])  # acceptance 0.9 0.8 0.7: TPF 2.42 at N = 4, 2.27 at N = 3
    assert policy.choose(1) == 4
    for _ in range(60):
        policy.observe_cost(1, 4, 1.06 * 1.6)  # the steps of N = 4 take 1.6x what the table says
    assert policy.cost_scale[4] == pytest.approx(1.6, rel=0.01)
    assert policy.step_cost(1, 7) == pytest.approx(1.06 * 1.6, rel=0.01)
    assert policy.choose(1) == 3
    policy.observe_cost(1, 1, 0.4)  # AR measured at 0.4x the table (its first measurement is taken whole)
    assert policy.cost_scale[1] == 0.4 and policy.choose(1) == 1  # 2.5 tokens per table-second beats N = 3's 2.18


def test_exploration_runs_the_runner_up_now_and_then():
    rows = (1, 3, 5, 7)
    table = StepCostTable((1,), rows, ((1.0, 3.0, 5.0, 7.0),))  # every row costs the same: AR wins
    policy = AdaptiveStride(4, table, explore_every=10)
    picks = [policy.choose(1) for _ in range(30)]
    assert picks.count(1) == 27 and picks[9] == picks[19] == picks[29] == 2  # N = 2 is the runner-up
    quiet = AdaptiveStride(4, table, explore_every=0)
    assert {quiet.choose(1) for _ in range(300)} == {1}
