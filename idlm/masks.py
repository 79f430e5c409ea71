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

The x_t half may be *compacted* to the K rows that can matter (``noisy_index``): rows whose block holds a
supervised position. Other x_t rows are neither supervised nor visible to any supervised row, so dropping
them changes no loss or gradient; the sequence shrinks from 2L to K + L.
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


def _concat_tables(layout: SequenceLayout, noisy_index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Attribute tables over the concatenated indices [x_t rows | x_0 rows]: noisy [K + L], pos/blk/valid [B, K + L].

    noisy_index: [B, K] original position of each x_t row (-1 = padding row); None = all L positions.
    Padding x_t rows get block -1 and are invalid, so they see only themselves and nobody sees them.
    """
    B, L = layout.positions.shape
    device = layout.positions.device
    if noisy_index is None:
        noisy_index = torch.arange(L, device=device).expand(B, L)
    K = noisy_index.shape[1]
    is_row = noisy_index >= 0
    src = noisy_index.clamp(min=0)
    pos_t = torch.where(is_row, layout.positions.gather(1, src), 0)
    blk_t = torch.where(is_row, layout.block_ids.gather(1, src), -1)
    valid_t = is_row & layout.valid.gather(1, src)
    noisy = torch.arange(K + L, device=device) < K
    pos = torch.cat([pos_t, layout.positions], dim=1)
    blk = torch.cat([blk_t, layout.block_ids], dim=1)
    valid = torch.cat([valid_t, layout.valid], dim=1)
    return noisy, pos, blk, valid


def dense_mask(layout: SequenceLayout, noisy_index: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, K + L, K + L] (True = attend), for SDPA on CPU and for tests."""
    noisy, pos, blk, valid = _concat_tables(layout, noisy_index)
    n = noisy.shape[0]
    idx = torch.arange(n, device=noisy.device)
    allowed = attention_rule(
        noisy[None, :, None], pos[:, :, None], blk[:, :, None],
        noisy[None, None, :], pos[:, None, :], blk[:, None, :], valid[:, None, :],
        (idx[:, None] == idx[None, :])[None],
    )
    return allowed[:, None]


def flex_mask_mod(layout: SequenceLayout, noisy_index: torch.Tensor | None = None):
    """A flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` evaluating the rule from the attribute tables."""
    noisy, pos, blk, valid = _concat_tables(layout, noisy_index)

    def mask_mod(b, h, q_idx, kv_idx):
        return attention_rule(
            noisy[q_idx], pos[b, q_idx], blk[b, q_idx],
            noisy[kv_idx], pos[b, kv_idx], blk[b, kv_idx], valid[b, kv_idx],
            q_idx == kv_idx,
        )

    return mask_mod


def flex_block_mask(layout: SequenceLayout, noisy_index: torch.Tensor | None = None, compile_mask: bool | None = None):
    """A flex_attention BlockMask for the rule, built compiled on CUDA (block by block from the mask_mod).

    Known gap: on an H100 (torch 2.11) the compiled build at K + L = 16k still peaked above 1/8 of a dense bool
    mask (tests/gpu/test_flex_objective.py::test_block_mask_is_built_without_dense_tensor fails); building the
    BlockMask's block tables directly from the closed-form rule is the planned fix.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    B, L = layout.positions.shape
    n = L + (L if noisy_index is None else noisy_index.shape[1])
    device = layout.positions.device
    if compile_mask is None:
        compile_mask = device.type == "cuda"
    return create_block_mask(flex_mask_mod(layout, noisy_index), B, None, n, n, device=device, _compile=compile_mask)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype min elsewhere), for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)
