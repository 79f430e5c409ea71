"""idlm.ceiling: the best first-draft acceptance a drafter that does not see the token before its own can reach."""

from __future__ import annotations

import pytest
import torch

from idlm.adaptive import tokens_per_forward
from idlm.ceiling import acceptance, draft_ceiling, sharpened, tpf_bound


def test_hand_cases():
    # one possible u: the drafter can be p(. | c, u) itself
    p = torch.tensor([[0.5, 0.3, 0.2]])
    c = draft_ceiling(torch.tensor([1.0]), p)
    assert c.sampled == pytest.approx(1.0) and c.marginal == pytest.approx(1.0) and c.argmax == pytest.approx(0.5)
    # two u, each fixing a different next token: all mass on the likelier one beats the marginal
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = draft_ceiling(torch.tensor([0.7, 0.3]), p)
    assert c.sampled == pytest.approx(0.7) and c.argmax == pytest.approx(0.7)
    assert c.marginal == pytest.approx(0.7 * 0.7 + 0.3 * 0.3)
    # enumerated mass below 1: every ceiling is at most that mass
    c = draft_ceiling(torch.tensor([0.4, 0.2]), torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert c.mass == pytest.approx(0.6) and max(c.sampled, c.argmax, c.marginal) <= 0.6 + 1e-12


def test_equals_the_linear_program_and_beats_every_other_drafter():
    """max_q sum_u w_u sum_x min(p_u(x), q(x)) as a linear program (scipy's HiGHS) on random cases; no random
    drafter, nor the marginal, does better."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    g = torch.Generator().manual_seed(0)
    for m, v in [(3, 5), (6, 12), (10, 40)]:
        w = torch.rand(m, generator=g, dtype=torch.float64)
        w = 0.9 * w / w.sum()
        p = torch.softmax(3 * torch.randn(m, v, generator=g, dtype=torch.float64), -1)
        c = draft_ceiling(w, p)
        # variables: q [V], t [M, V] with t <= p, t <= q; maximise sum w_u t_ux; sum q = 1
        n = v + m * v
        cost = torch.cat([torch.zeros(v, dtype=torch.float64), -(w[:, None].expand(m, v)).flatten()]).numpy()
        a_ub, b_ub = [], []
        for u in range(m):
            for x in range(v):
                row = [0.0] * n
                row[v + u * v + x], row[x] = 1.0, -1.0  # t_ux - q_x <= 0
                a_ub.append(row)
                b_ub.append(0.0)
        bounds = [(0, 1)] * v + [(0, float(p[u, x])) for u in range(m) for x in range(v)]
        res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=[[1.0] * v + [0.0] * (m * v)], b_eq=[1.0], bounds=bounds,
                      method="highs")
        assert res.status == 0
        assert c.sampled == pytest.approx(-res.fun, abs=1e-9)
        assert c.argmax == pytest.approx(float((w @ p).max()))
        for _ in range(200):
            q = torch.distributions.Dirichlet(torch.full((v,), 0.5, dtype=torch.float64)).sample()
            assert acceptance(w, p, q) <= c.sampled + 1e-12
        assert c.marginal <= c.sampled + 1e-12


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"weights \[M\] and probs \[M, V\]"):
        draft_ceiling(torch.ones(2), torch.ones(3, 4))


def test_tpf_bound():
    assert tpf_bound(0.0, 4) == pytest.approx(1.0) and tpf_bound(1.0, 4) == pytest.approx(4.0)
    assert tpf_bound(0.5, 4) == pytest.approx(2.0)  # (1 + 3a + 1 - a) / (2 - a)
    assert tpf_bound(0.3, 1) == 1.0
    # the bound is tokens_per_forward's with the later positions always accepted, and above any real one
    for a in (0.2, 0.45, 0.8):
        assert tpf_bound(a, 4) == pytest.approx(tokens_per_forward([a, 1.0, 1.0], 4))
        assert tpf_bound(a, 4) >= tokens_per_forward([a, 0.9, 0.7], 4)
    with pytest.raises(ValueError, match="acceptance must be in"):
        tpf_bound(1.5, 4)


def test_acceptance_and_sharpened_drafts():
    w = torch.tensor([0.6, 0.4])
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0]])
    q = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert acceptance(w, p, q) == pytest.approx(0.6 * (0.5 + 0.2 + 0.1) + 0.4 * (0.1 + 0.3 + 0.2))
    assert torch.allclose(sharpened(q, 1.0), q.double())
    s = sharpened(q, 0.5)  # q^2 renormalised, the zero stays zero
    assert torch.allclose(s, q.double() ** 2 / (q.double() ** 2).sum()) and s[3] == 0
    assert sharpened(q, 0.01)[0] == pytest.approx(1.0)  # towards the argmax
    # sharpening the marginal can beat it, and never beats the ceiling
    p_bar = w @ p
    c = draft_ceiling(w, p)
    assert c.marginal == pytest.approx(acceptance(w, p, p_bar))
    assert max(acceptance(w, p, sharpened(p_bar, t)) for t in (1.0, 0.7, 0.5, 0.3)) <= c.sampled + 1e-12
    with pytest.raises(ValueError, match="tau must be > 0"):
        sharpened(q, 0.0)
