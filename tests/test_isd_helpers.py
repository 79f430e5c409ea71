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
