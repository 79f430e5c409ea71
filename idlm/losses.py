"""Cross-entropy over a linear head that never materialises the full [rows, vocab] logits."""

from __future__ import annotations

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
