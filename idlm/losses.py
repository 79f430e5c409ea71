"""Cross-entropy over a linear head that never materialises the full [rows, vocab] logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor):
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32, fp64 stays
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 2048,
) -> tuple[torch.Tensor, int]:
    """Summed next-token CE of ``hidden @ weight.T (+ bias)`` against ``targets``, and the target count.

    hidden: [N, d]; weight: [V, d]; targets: [N] with IGNORE_INDEX for rows without a target.
    Only rows with a target are projected, ``chunk_size`` rows at a time; each chunk is checkpointed, so
    forward and backward hold at most one [chunk_size, V] float32 logits block. With no target the
    result is an exact 0 that stays connected to the graph (no NaN, and DDP sees every parameter used).
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
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, count, chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce_sum, h[sl], weight, bias, t[sl], use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h[sl], weight, bias, t[sl])
    return total, count
