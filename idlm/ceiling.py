"""How much any drafter can accept when it does not see the token before its own: the ceiling of ISD's sampled
acceptance that the target model alone sets.

An ISD step samples the token after the last committed one from p in the same forward that drafts the positions
after it, so the first draft x is written without knowing that token u (the k-th draft without the k tokens
before it). The verifier then accepts it against p(x | c, u). Whatever distribution q the drafter proposes from c
alone, the acceptance of its first draft is

    sampled drafts (min(1, p/q) + residual):   A(q) = sum_u p(u | c) sum_x min(p(x | c, u), q(x))
    argmax drafts (accept x* w.p. p(x*)):      A(x*) = sum_u p(u | c) p(x* | c, u)

so its best is max_q A(q), resp. max_x p_bar(x) with p_bar = sum_u p(u | c) p(. | c, u). Both depend on the target
model and the sampling rule only: a bound on what training a drafter (the MASK rows) can reach. Greedy decoding has
no such ceiling (u is the argmax, known to a drafter that models it).

max_q A(q) is a separable concave maximisation over the simplex: A(q) = sum_x f_x(q_x) with f_x piecewise linear,
its slope on q_x in [v_(j+1), v_(j)] (the values p(x | c, u) sorted in decreasing order) the weight of the u with
p(x | c, u) >= v_(j). Filling the unit of mass into the segments of highest slope first is optimal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.adaptive import tokens_per_forward


@dataclass(frozen=True)
class Ceiling:
    """The best first-draft acceptance for one context, over the enumerated u (weights summing to ``mass``)."""

    sampled: float  # max_q A(q): the best sampled drafter
    argmax: float  # max_x p_bar(x): the best argmax drafter
    marginal: float  # A(p_bar / mass): a drafter that has learnt the marginal exactly
    mass: float  # sum of the enumerated p(u | c); the rest can add at most 1 - mass to any acceptance


def draft_ceiling(weights: torch.Tensor, probs: torch.Tensor) -> Ceiling:
    """weights [M] = p(u | c) of M enumerated next tokens u (sum <= 1); probs [M, V] = p(. | c, u), rows summing
    to 1. Returns the ceilings over those u (each at most ``mass``)."""
    if weights.dim() != 1 or probs.dim() != 2 or probs.shape[0] != weights.shape[0]:
        raise ValueError(f"weights [M] and probs [M, V] expected, got {tuple(weights.shape)} and {tuple(probs.shape)}")
    w = weights.double()
    p = probs.double()
    mass = float(w.sum())
    p_bar = w @ p  # [V]
    argmax = float(p_bar.max())
    marginal = acceptance(w, p, p_bar / mass) if mass > 0 else 0.0
    # segments: per token x, its values sorted high to low; segment j spans [v_(j+1), v_(j)] with slope W_j
    vals, order = p.sort(dim=0, descending=True)  # [M, V]
    slope = w[order].cumsum(0)  # W_j: weight of the u whose value is >= v_(j)
    below = torch.cat([vals[1:], torch.zeros_like(vals[:1])], dim=0)
    length = (vals - below).flatten()
    slope = slope.flatten()
    keep = length > 0
    slope, length = slope[keep], length[keep]
    best = slope.argsort(descending=True)
    slope, length = slope[best], length[best]
    filled = length.cumsum(0)
    take = torch.clamp(1.0 - (filled - length), min=0.0)  # what is left of the unit when the segment is reached
    sampled = float((slope * torch.minimum(length, take)).sum())
    return Ceiling(sampled=sampled, argmax=argmax, marginal=marginal, mass=mass)


def acceptance(weights: torch.Tensor, probs: torch.Tensor, q: torch.Tensor) -> float:
    """A(q) = sum_u w_u sum_x min(p(x | c, u), q(x)): the first-draft acceptance of sampled drafts from q [V]
    (weights [M], probs [M, V] as for `draft_ceiling`)."""
    return float((weights.double()[:, None] * torch.minimum(probs.double(), q.double()[None])).sum())


def sharpened(q: torch.Tensor, tau: float) -> torch.Tensor:
    """q^(1 / tau), renormalised: a draft distribution at temperature tau relative to q's own (tau < 1 sharper)."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logq = torch.log(q.double().clamp_min(1e-300)) / tau
    out = torch.softmax(logq, -1)
    return torch.where(q > 0, out, torch.zeros_like(out))


def tpf_bound(first_acceptance: float, stride: int) -> float:
    """Tokens per forward at stride N when the first draft is accepted with probability a and every later draft
    always (`idlm.adaptive.tokens_per_forward` of [a, 1, ..., 1]): an upper bound on TPF when no drafter can
    accept its first draft with probability above a."""
    a = float(first_acceptance)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {a}")
    return tokens_per_forward([a] + [1.0] * (stride - 2), stride)
