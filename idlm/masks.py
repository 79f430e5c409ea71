"""The I-DLM attention rule over the concatenated sequence [x_t | x_0] (length 2L).

For a query q and a key k with positions p (within their half) and block ids B:

    x_0 -> x_0 : p_k <= p_q                      (plain causal LM: the clean half is the AR model)
    x_0 -> x_t : never
    x_t -> x_t : B_k == B_q and p_k <= p_q       (causal inside the own mask block)
    x_t -> x_0 : B_k <  B_q                      (clean tokens of strictly earlier blocks)

and padding keys are never seen (except by the padding query itself, so no row is empty).

The rule is written once (`attention_rule`) over per-index attribute tables and evaluated either
densely (a boolean SDPA mask, for CPU and tests) or lazily as a flex_attention ``mask_mod`` (GPU),
which never materialises a 2L x 2L tensor when the block mask is built compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class SequenceLayout:
    """Per-position attributes of a batch of rows, shared by both halves.

    positions: [B, L] RoPE position of each index (0-based over the non-padding tokens).
    block_ids: [B, L] mask-block index, non-decreasing along the row.
    valid:     [B, L] False on padding.
    """

    positions: torch.Tensor
    block_ids: torch.Tensor
    valid: torch.Tensor

    @property
    def seq_len(self) -> int:
        return self.positions.shape[1]


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] from a padding mask [B, L]: 0.. over real tokens (left or right padding)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def compute_block_ids(
    supervised: torch.Tensor,
    positions: torch.Tensor,
    block_size: int,
    align: Literal["response", "sequence"] = "response",
) -> torch.Tensor:
    """Block id of each position, [B, L].

    supervised: [B, L] bool, True where the token is a training target (it is masked in x_t).
    ``"sequence"``: blocks of ``block_size`` positions from position 0 (the paper's code).
    ``"response"``: a new block starts at every change of supervision status (e.g. each response start)
    and every ``block_size`` positions inside a run, so a mask block never contains prompt tokens.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if align == "sequence":
        return positions // block_size
    if align != "response":
        raise ValueError(f"unknown block alignment {align!r}")
    B, L = supervised.shape
    idx = torch.arange(L, device=supervised.device).expand(B, L)
    run_start = torch.ones_like(supervised)
    run_start[:, 1:] = supervised[:, 1:] != supervised[:, :-1]
    # index of the start of the run each position belongs to (running max of start indices)
    start_idx = torch.where(run_start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    new_block = (idx - start_idx) % block_size == 0
    return new_block.long().cumsum(-1) - 1


def attention_rule(
    q_noisy: torch.Tensor,
    q_pos: torch.Tensor,
    q_blk: torch.Tensor,
    k_noisy: torch.Tensor,
    k_pos: torch.Tensor,
    k_blk: torch.Tensor,
    k_valid: torch.Tensor,
    same_index: torch.Tensor,
) -> torch.Tensor:
    """The closed-form rule on broadcastable attribute tensors (see module docstring); returns bool."""
    causal = k_pos <= q_pos
    noisy_noisy = q_noisy & k_noisy & (k_blk == q_blk) & causal
    noisy_clean = q_noisy & ~k_noisy & (k_blk < q_blk)
    clean_clean = ~q_noisy & ~k_noisy & causal
    return (noisy_noisy | noisy_clean | clean_clean) & (k_valid | same_index)


def _doubled_tables(layout: SequenceLayout) -> tuple[torch.Tensor, ...]:
    """Attribute tables over the 2L concatenated indices: noisy [2L], pos/blk/valid [B, 2L]."""
    L = layout.seq_len
    device = layout.positions.device
    noisy = torch.arange(2 * L, device=device) < L
    pos = torch.cat([layout.positions, layout.positions], dim=1)
    blk = torch.cat([layout.block_ids, layout.block_ids], dim=1)
    valid = torch.cat([layout.valid, layout.valid], dim=1)
    return noisy, pos, blk, valid


def dense_mask(layout: SequenceLayout) -> torch.Tensor:
    """Boolean mask [B, 1, 2L, 2L] (True = attend), for SDPA on CPU and for tests."""
    noisy, pos, blk, valid = _doubled_tables(layout)
    n = noisy.shape[0]
    idx = torch.arange(n, device=noisy.device)
    allowed = attention_rule(
        noisy[None, :, None], pos[:, :, None], blk[:, :, None],
        noisy[None, None, :], pos[:, None, :], blk[:, None, :], valid[:, None, :],
        (idx[:, None] == idx[None, :])[None],
    )
    return allowed[:, None]


def flex_mask_mod(layout: SequenceLayout):
    """A flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` evaluating the rule from the attribute tables."""
    noisy, pos, blk, valid = _doubled_tables(layout)

    def mask_mod(b, h, q_idx, kv_idx):
        return attention_rule(
            noisy[q_idx], pos[b, q_idx], blk[b, q_idx],
            noisy[kv_idx], pos[b, kv_idx], blk[b, kv_idx], valid[b, kv_idx],
            q_idx == kv_idx,
        )

    return mask_mod


def flex_block_mask(layout: SequenceLayout, compile_mask: bool | None = None):
    """A flex_attention BlockMask for the rule. Compiled on CUDA so no dense 2L x 2L tensor is built."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = layout.positions.shape
    device = layout.positions.device
    if compile_mask is None:
        compile_mask = device.type == "cuda"
    return create_block_mask(flex_mask_mod(layout), B, None, 2 * L, 2 * L, device=device, _compile=compile_mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype min elsewhere), for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)
