"""The statistical helpers the exactness tests rely on (tests/isd_helpers.py) must themselves have the right size
and power."""

from __future__ import annotations

import random

from tests.isd_helpers import g_test_two_sample


def test_two_sample_g_test_accepts_one_distribution_and_rejects_two():
    rng = random.Random(0)
    weights = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]
    draw = lambda w, n: rng.choices(range(len(w)), weights=w, k=n)  # noqa: E731
    p_values = [g_test_two_sample(draw(weights, 1500), draw(weights, 1500))[0] for _ in range(40)]
    assert sum(p < 0.05 for p in p_values) <= 6  # about 2 expected at a 5% level
    shifted = [0.35, 0.25, 0.15, 0.1, 0.05, 0.03, 0.07]  # 5% of the mass moved to the last outcome
    p, df = g_test_two_sample(draw(weights, 1500), draw(shifted, 1500))
    assert df == 6 and p < 1e-3
    # rare outcomes are pooled into one cell; a one-cell table has nothing to test
    p, df = g_test_two_sample([0] * 50 + [1, 2], [0] * 50 + [3])
    assert df == 1 and p > 0.1
    assert g_test_two_sample([0] * 50, [0] * 40) == (1.0, 0)


def test_stop_token_choice_spreads_the_lengths():
    """`pick_stop_token` takes the token whose first occurrences spread AR's outputs over the most lengths, among
    those ending a third of them early; `stop_lengths` is where a stop token would end each output."""
    from tests.isd_helpers import frequent_outcomes, histogram, pick_stop_token, stop_lengths

    cap = 8
    # 7 ends every output at one length and 3 at two; 9 ends four of six early at four lengths; 5 ends one early
    outs = [[1, 2, 7, 9, 3, 3, 3, 3], [1, 2, 7, 3, 9, 3, 3, 3], [4, 2, 7, 3, 3, 9, 3, 3], [4, 2, 7, 3, 3, 3, 9, 3],
            [1, 2, 7, 3, 3, 3, 3, 5], [1, 2, 7, 3, 3, 3, 3, 3]]
    assert stop_lengths(outs, 9, cap) == [4, 5, 6, 7, 8, 8]
    assert stop_lengths(outs, 7, cap) == [3] * 6
    assert stop_lengths([[1, 2, 3]], 2, 1) == [1]  # never past the cap
    assert frequent_outcomes(stop_lengths(outs, 9, cap), 0.1) == 5
    assert pick_stop_token(outs, cap, min_share=0.1) == (9, 5)
    assert pick_stop_token(outs, cap, min_share=0.1, min_early=0.9) == (3, 2)  # 3 and 7 end all early
    assert pick_stop_token([[1, 2, 3]] * 4, 3) == (None, 0)  # a stop at the cap's last position ends nothing early
    assert histogram([3, 1, 3, 2]) == "{1: 1, 2: 1, 3: 2}"
    assert histogram([(1, 2)] * 3 + [(1, 3)] * 2 + [(4,)], top=1) == "{(1, 2): 3, others: 3}"
