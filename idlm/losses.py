"""Cross-entropy over a linear head that never materialises the full [rows, vocab] logits."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk and, if ``want_grad``, d(sum)/d(logits) = softmax - onehot ([c, V], float32+)."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    lse = torch.logsumexp(logits, dim=-1)
    total = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    if not want_grad:
        return total, None
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0
    return total, grad


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T + bias`` whose gradients are computed chunk by chunk in the forward pass.

    The backward of a scalar loss only rescales them, so no logits are recomputed (a checkpointed chunk costs one
    extra LM-head matmul per chunk) and at most one [chunk, V] float32 block is alive at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            loss, g = _chunk_ce(h, weight, bias, targets[start:start + chunk_size], want_grad=True)
            total += loss
            g = g.to(hidden.dtype)
            torch.mm(g, weight, out=grad_h[start:start + chunk_size])
            grad_w += torch.mm(g.t(), h)  # in the input dtype (fp32 accumulation inside), summed over chunks in fp32
            if grad_b is not None:
                grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(grad_h.dtype)
        return (grad_h * scale, grad_w * scale.to(grad_w.dtype),
                None if grad_b is None else grad_b * scale.to(grad_b.dtype), None, None)


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, int]:
    """Summed next-token CE of ``hidden @ weight.T (+ bias)`` against ``targets``, and the target count.

    hidden: [N, d]; weight: [V, d]; targets: [N] with IGNORE_INDEX for rows without a target.
    Only rows with a target are projected, ``chunk_size`` rows at a time. With autograd on, the gradients are
    computed in the same pass (`_LinearCrossEntropySum`): forward and backward together run the LM head's three
    matmuls once and hold at most one [chunk_size, V] float32 logits block. With no target the result is an exact
    0 that stays connected to the graph (no NaN, and DDP sees every parameter used).
    """
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    keep = targets != IGNORE_INDEX
    rows = keep.nonzero(as_tuple=True)[0]
    count = int(rows.numel())
    if count == 0:
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.to(acc_dtype), 0
    h = hidden.index_select(0, rows)
    t = targets.index_select(0, rows)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, weight, bias))
    if needs_grad:
        return _LinearCrossEntropySum.apply(h, weight, bias, t, chunk_size), count
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, count, chunk_size):
        total = total + _chunk_ce(h[start:start + chunk_size], weight, bias, t[start:start + chunk_size], False)[0]
    return total, count


# ---------------------------------------------------------------------------------------------------------------
# Distillation: cross-entropy against a mixture of the data token and a frozen teacher's distribution


class MixedCE(NamedTuple):
    """Sums over the rows with a target (all float32+ scalars; only ``mixed`` carries a graph).

    mixed:   sum of CE(target, q) with target = (1 - mix) * onehot(data token) + mix * p_teacher.
    hard:    sum of CE(onehot, q), the ordinary next-token loss (detached).
    soft:    sum of CE(p_teacher, q) (detached).
    entropy: sum of H(p_teacher) (detached); KL(p_teacher || q) = soft - entropy, and ``mixed - mix * entropy``
             has the same gradient as ``(1 - mix) * hard + mix * KL``.
    count:   number of rows with a target.
    gap:     sum of 1 - sum_x min(p_teacher(x), q(x)) (detached): what a draft sampled from q misses of the
             acceptance min(1, p/q) against p; with ``accept`` > 0, ``mixed`` also holds ``accept * gap``.
    """

    mixed: torch.Tensor
    hard: torch.Tensor
    soft: torch.Tensor
    entropy: torch.Tensor
    count: int
    gap: torch.Tensor | None = None


def _chunk_mixed(h, weight, bias, th, t_weight, t_bias, targets, mix: float, want_grad: bool, accept: float = 0.0):
    """One chunk: (mixed, hard, soft, entropy, gap) sums and, if ``want_grad``, d(mixed)/d(logits).

    mixed = (1 - mix) CE(onehot) + mix CE(p) + accept * gap, gap = sum over rows of 1 - sum_x min(p_x, q_x). With
    S = {x: q_x < p_x}, d(gap)/d(logit_j) = q_j (q(S) - [j in S]), so the gradient is
    q - target + accept * q * (q(S) - 1[S]). At most three [chunk, V] float32 blocks are alive at once (student
    log-probs, teacher log-probs, teacher probs), four with ``accept``."""
    acc = torch.promote_types(h.dtype, torch.float32)
    with torch.no_grad():
        t_logp = torch.log_softmax(F.linear(th, t_weight, t_bias).to(acc), dim=-1)
        p = t_logp.exp()
        entropy = -torch.dot(p.view(-1), t_logp.view(-1))
        del t_logp
    logq = F.linear(h, weight, bias).to(acc)
    logq = logq.sub_(torch.logsumexp(logq, dim=-1, keepdim=True))
    hard = -logq.gather(1, targets[:, None]).sum()
    soft = -torch.dot(p.view(-1), logq.view(-1))
    grad = logq.exp_()  # q, in place of the log-probs (no longer needed)
    gap = grad.shape[0] - torch.minimum(grad, p).sum()
    mixed = (1.0 - mix) * hard + mix * soft + accept * gap
    if not want_grad:
        return (mixed, hard, soft, entropy, gap), None
    if accept > 0:
        below = torch.lt(grad, p)  # S, bool
        q_below = (grad * below).sum(-1, keepdim=True)  # q(S) per row
        extra = grad * (q_below - below.to(grad.dtype))
    grad.sub_(p, alpha=mix)
    grad[torch.arange(grad.shape[0], device=grad.device), targets] -= 1.0 - mix
    if accept > 0:
        grad.add_(extra, alpha=accept)
    return (mixed, hard, soft, entropy, gap), grad


class _LinearMixedCrossEntropySum(torch.autograd.Function):
    """`_LinearCrossEntropySum` with a target distribution mixed from the data token and a teacher's softmax;
    the teacher's logits are computed chunk by chunk under no_grad, so neither model's [rows, V] logits exist."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, targets, mix, chunk_size,
                accept):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        sums = torch.zeros(5, dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if bias is not None else None
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl]
            parts, g = _chunk_mixed(h, weight, bias, teacher_hidden[sl], teacher_weight, teacher_bias, targets[sl],
                                    mix, want_grad=True, accept=accept)
            sums += torch.stack([x.detach() for x in parts])
            g = g.to(hidden.dtype)
            torch.mm(g, weight, out=grad_h[sl])
            grad_w += torch.mm(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(sums)
        return sums[0].clone(), sums

    @staticmethod
    def backward(ctx, grad_out, _grad_sums):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out.to(grad_h.dtype)
        return (grad_h * scale, grad_w * scale.to(grad_w.dtype),
                None if grad_b is None else grad_b * scale.to(grad_b.dtype), None, None, None, None, None, None,
                None)


def linear_mixed_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mix: float,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
    accept: float = 0.0,
) -> MixedCE:
    """Summed CE of ``hidden @ weight.T (+ bias)`` against ``(1 - mix) * onehot(targets) + mix * softmax(teacher)``,
    plus ``accept`` times the summed acceptance gap 1 - sum_x min(p, q) (`MixedCE.gap`).

    hidden, teacher_hidden: [N, d] and [N, d_t] (row i of both belongs to the same target); weight: [V, d];
    teacher_weight: [V, d_t] (same vocabulary); targets: [N] with IGNORE_INDEX for rows without a target.
    Only rows with a target are projected, ``chunk_size`` at a time, through both heads (the teacher's under
    no_grad); gradients are computed in the same pass as in `linear_cross_entropy_sum`. mix = 0 gives that
    function's value and gradient (plus the diagnostics); with no target the sums are exact zeros on the graph.
    """
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {weight.shape[0]} vs {teacher_weight.shape[0]}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if not accept >= 0.0:
        raise ValueError(f"accept must be >= 0, got {accept}")
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    rows = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    count = int(rows.numel())
    if count == 0:
        zero = (hidden.sum() * 0.0 + weight.sum() * 0.0).to(acc_dtype)
        z = zero.detach()
        return MixedCE(zero, z, z, z, 0, z)
    h = hidden.index_select(0, rows)
    th = teacher_hidden.index_select(0, rows).detach()
    t = targets.index_select(0, rows)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, weight, bias))
    if needs_grad:
        mixed, sums = _LinearMixedCrossEntropySum.apply(h, weight, bias, th, teacher_weight.detach(),
                                                         None if teacher_bias is None else teacher_bias.detach(),
                                                         t, float(mix), chunk_size, float(accept))
        return MixedCE(mixed, sums[1], sums[2], sums[3], count, sums[4])
    sums = torch.zeros(5, dtype=acc_dtype, device=hidden.device)
    for start in range(0, count, chunk_size):
        sl = slice(start, start + chunk_size)
        parts, _ = _chunk_mixed(h[sl], weight, bias, th[sl], teacher_weight, teacher_bias, t[sl], float(mix), False,
                                float(accept))
        sums += torch.stack(parts)
    return MixedCE(sums[0], sums[1], sums[2], sums[3], count, sums[4])
