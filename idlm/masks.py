"""The I-DLM attention rule over the concatenated sequence [x_t | x_0] (length 2L).

For a query q and a key k with positions p (within their half) and block ids B:

    x_0 -> x_0 : p_k <= p_q                      (plain causal LM: the clean half is the AR model)
    x_0 -> x_t : never
    x_t -> x_t : B_k == B_q and p_k <= p_q       (causal inside the own mask block)
    x_t -> x_0 : B_k <  B_q                      (clean tokens of strictly earlier blocks)

and padding keys are never seen (except by the padding query itself, so no row is empty).

The rule is written once (`attention_rule`) over per-index attribute tables and evaluated either
densely (a boolean SDPA mask, for CPU and tests) or lazily as a flex_attention ``mask_mod`` (GPU).

The flex ``BlockMask`` (`flex_block_mask`) is built from the closed form, not by evaluating the mask_mod
over [Q, KV] (which is what ``create_block_mask`` does, compiled or not; on an H100 its build at 16k rows
peaked above 1/8 of a dense bool mask). Positions and block ids are non-decreasing along a row, so each
query's allowed keys are at most two index intervals (`_key_intervals`): an x_0 query sees the x_0 prefix
with pos <= its pos;
an x_t query sees the run of x_t rows of its own block up to its pos, and the x_0 prefix of strictly
earlier blocks; padding keys are removed by counting with a prefix sum of ``valid``, and a padding query
adds itself. Clipping the intervals to each key tile gives the number of allowed pairs per (query tile,
key tile) in O(Q * KV / KV_BLOCK) work, a few query tiles at a time (work tensors of about 1 MiB, or of one
query tile, 16 * B * (K + L) bytes, when that is more), never O(Q * KV) memory; a tile is FULL
when the count is the tile's area (tiles cut by the sequence end never are, as in ``create_block_mask``),
EMPTY at 0, PARTIAL otherwise, and ``BlockMask.from_kv_blocks`` takes the tables, with the mask_mod kept for
PARTIAL tiles. A layout that is not monotone (none that `idlm.objective.build_inputs` makes) falls back to
evaluating the rule one chunk of query tiles at a time: exact, bounded memory, O(Q * KV) work.

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


def _mask_mod_from_tables(noisy, pos, blk, valid):
    def mask_mod(b, h, q_idx, kv_idx):
        return attention_rule(
            noisy[q_idx], pos[b, q_idx], blk[b, q_idx],
            noisy[kv_idx], pos[b, kv_idx], blk[b, kv_idx], valid[b, kv_idx],
            q_idx == kv_idx,
        )

    return mask_mod


def flex_mask_mod(layout: SequenceLayout, noisy_index: torch.Tensor | None = None):
    """A flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` evaluating the rule from the attribute tables."""
    return _mask_mod_from_tables(*_concat_tables(layout, noisy_index))


# Elements of one [batch, query rows, 2, key blocks] work tensor while counting (1 MiB of int64); bounds the
# build's memory at a few such tensors whatever the sequence length.
_COUNT_CHUNK_ELEMENTS = 1 << 17


def _non_decreasing(*xs: torch.Tensor) -> bool:
    """True when every [B, M] tensor is non-decreasing along dim 1 (one host sync for all of them)."""
    checks = [(x[:, 1:] >= x[:, :-1]).all() for x in xs if x.shape[1] > 1]
    return bool(torch.stack(checks).all()) if checks else True


def _key_intervals(
    pos: torch.Tensor, blk: torch.Tensor, is_row: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per query, the rule's allowed keys as two index intervals: [B, K + L, 2] starts and ends (ends exclusive).

    The allowed keys of query q are (the union of its intervals, restricted to valid keys) plus q itself.
    Needs positions and block ids non-decreasing along the row in both halves, with the padding x_t rows
    (``is_row`` False) after the real ones; returns None otherwise (the caller then evaluates the rule).

        x_0 query at i:          x_0 keys m with pos[m] <= pos[i]                 -> a prefix of x_0
        x_t query (block b, p):  x_t rows with blk == b and pos <= p               -> one run of x_t rows
                                 x_0 keys m with blk[m] < b                        -> a prefix of x_0
        padding x_t row:         nothing (it sees only itself)
    """
    B, n = pos.shape
    K = is_row.shape[1]
    big = torch.iinfo(torch.long).max
    pos_t = torch.where(is_row, pos[:, :K], big).contiguous()  # padding rows sort last
    blk_t = torch.where(is_row, blk[:, :K], big).contiguous()
    pos_0 = pos[:, K:].contiguous()
    blk_0 = blk[:, K:].contiguous()
    if not _non_decreasing(pos_t, blk_t, pos_0, blk_0):
        return None
    starts = torch.zeros(B, n, 2, dtype=torch.long, device=pos.device)
    ends = torch.zeros_like(starts)
    # x_0 queries: the x_0 prefix with pos <= own pos
    starts[:, K:, 0] = K
    ends[:, K:, 0] = K + torch.searchsorted(pos_0, pos_0, right=True)
    # x_t queries: own block, causal, among the x_t rows; clean keys of strictly earlier blocks
    qb, qp = blk[:, :K].contiguous(), pos[:, :K].contiguous()
    lo = torch.searchsorted(blk_t, qb)
    hi = torch.minimum(torch.searchsorted(blk_t, qb, right=True), torch.searchsorted(pos_t, qp, right=True))
    starts[:, :K, 0] = torch.where(is_row, lo, 0)
    ends[:, :K, 0] = torch.where(is_row, torch.maximum(hi, lo), 0)
    starts[:, :K, 1] = K
    ends[:, :K, 1] = torch.where(is_row, K + torch.searchsorted(blk_0, qb), K)
    return starts, ends


def _block_counts_from_intervals(
    starts: torch.Tensor, ends: torch.Tensor, valid: torch.Tensor, q_bs: int, kv_bs: int,
) -> torch.Tensor:
    """Allowed (query, key) pairs per (query block, key block), [B, nq, nkv], from the per-query intervals.

    Per query and key block the count is a difference of the prefix sum of ``valid`` at the interval ends
    clipped to the block, plus 1 in the query's own block when the query is padding (it sees itself).
    Works through the queries in chunks of whole query blocks: memory O(chunk * nkv), never [Q, KV].
    """
    B, n, _ = starts.shape
    device = starts.device
    nq, nkv = -(-n // q_bs), -(-n // kv_bs)
    csum = torch.zeros(B, n + 1, dtype=torch.long, device=device)
    csum[:, 1:] = valid.long().cumsum(1)
    kv_lo = torch.arange(nkv, device=device) * kv_bs
    kv_hi = (kv_lo + kv_bs).clamp(max=n)
    out = torch.zeros(B, nq, nkv, dtype=torch.long, device=device)
    blocks_per_chunk = max(1, _COUNT_CHUNK_ELEMENTS // max(1, B * q_bs * nkv * 2))  # whole query blocks
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        r0, r1 = qb0 * q_bs, min(n, qb1 * q_bs)
        a = starts[:, r0:r1, :, None].clamp(kv_lo, kv_hi)  # [B, c, 2, nkv]
        e = ends[:, r0:r1, :, None].clamp(kv_lo, kv_hi)
        c = r1 - r0
        cnt = (csum.gather(1, e.reshape(B, -1)) - csum.gather(1, a.reshape(B, -1))).reshape(B, c, 2, nkv).sum(2)
        del a, e
        q = torch.arange(r0, r1, device=device)
        self_pad = (~valid[:, r0:r1]).long()[:, :, None]  # a padding query sees itself (not in its intervals)
        cnt.scatter_add_(2, (q // kv_bs).expand(B, c)[:, :, None], self_pad)
        pad_rows = (qb1 - qb0) * q_bs - c
        if pad_rows:
            cnt = torch.cat([cnt, cnt.new_zeros(B, pad_rows, nkv)], dim=1)
        out[:, qb0:qb1] = cnt.reshape(B, qb1 - qb0, q_bs, nkv).sum(2)
    return out


def _block_counts_by_evaluation(
    tables: tuple[torch.Tensor, ...], q_bs: int, kv_bs: int,
) -> torch.Tensor:
    """Fallback for layouts without monotone positions/blocks: evaluate the rule one chunk of query blocks at a
    time (memory O(chunk * (K + L)), never the whole [Q, KV] mask). Same output as the interval count."""
    noisy, pos, blk, valid = tables
    B, n = pos.shape
    device = pos.device
    nq, nkv = -(-n // q_bs), -(-n // kv_bs)
    out = torch.zeros(B, nq, nkv, dtype=torch.long, device=device)
    blocks_per_chunk = max(1, (_COUNT_CHUNK_ELEMENTS * 16) // max(1, B * q_bs * n))
    k = torch.arange(n, device=device)
    for qb0 in range(0, nq, blocks_per_chunk):
        qb1 = min(nq, qb0 + blocks_per_chunk)
        r0, r1 = qb0 * q_bs, min(n, qb1 * q_bs)
        q = torch.arange(r0, r1, device=device)
        allowed = attention_rule(
            noisy[None, q, None], pos[:, q, None], blk[:, q, None],
            noisy[None, None, :], pos[:, None, :], blk[:, None, :], valid[:, None, :],
            (q[:, None] == k[None, :])[None],
        )
        allowed = torch.nn.functional.pad(allowed, (0, nkv * kv_bs - n, 0, (qb1 - qb0) * q_bs - (r1 - r0)))
        out[:, qb0:qb1] = allowed.reshape(B, qb1 - qb0, q_bs, nkv, kv_bs).sum((2, 4))
    return out


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, nq, nkv] bool -> (num_blocks [B, 1, nq], indices [B, 1, nq, nkv]) int32, selected blocks first in
    ascending order (the layout create_block_mask produces)."""
    blocks = blocks.to(torch.int32)
    num = blocks.sum(-1).to(torch.int32)
    idx = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return num[:, None].contiguous(), idx[:, None].contiguous()


def _split_block_size(block_size: int | tuple[int, int]) -> tuple[int, int]:
    q_bs, kv_bs = (block_size, block_size) if isinstance(block_size, int) else block_size
    if q_bs < 1 or kv_bs < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return int(q_bs), int(kv_bs)


def _tables_and_counts(
    layout: SequenceLayout, noisy_index: torch.Tensor | None, q_bs: int, kv_bs: int,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if noisy_index is None:
        B, L = layout.positions.shape
        noisy_index = torch.arange(L, device=layout.positions.device).expand(B, L)
    tables = _concat_tables(layout, noisy_index)
    _, pos, blk, valid = tables
    intervals = _key_intervals(pos, blk, noisy_index >= 0)
    if intervals is None:
        return tables, _block_counts_by_evaluation(tables, q_bs, kv_bs)
    return tables, _block_counts_from_intervals(*intervals, valid, q_bs, kv_bs)


def block_counts(
    layout: SequenceLayout,
    noisy_index: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
) -> torch.Tensor:
    """Allowed (query, key) pairs of the rule per (query block, key block) tile, [B, nq, nkv] (int64).

    From the closed form (`_key_intervals`) when positions and blocks are non-decreasing along the row (every
    layout `idlm.objective.build_inputs` makes), else by evaluating the rule in chunks of query blocks.
    """
    return _tables_and_counts(layout, noisy_index, *_split_block_size(block_size))[1]


def flex_block_mask(
    layout: SequenceLayout,
    noisy_index: torch.Tensor | None = None,
    block_size: int | tuple[int, int] = 128,
):
    """A flex_attention BlockMask for the rule, built from the closed form on the layout's device.

    Each tile of ``block_size`` (query, key) indices (an int, or (query, key); 128 is flex's default) is FULL
    when every pair in it is allowed (the kernel skips the mask_mod there), EMPTY when none is (skipped), and
    PARTIAL otherwise (the mask_mod decides per element). Tiles that run past the sequence end count the missing
    pairs as not allowed, as ``create_block_mask`` does, so they are never FULL. No [Q, KV] tensor is built.
    """
    from torch.nn.attention.flex_attention import BlockMask

    q_bs, kv_bs = _split_block_size(block_size)
    tables, counts = _tables_and_counts(layout, noisy_index, q_bs, kv_bs)
    full = counts == q_bs * kv_bs
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    n = tables[0].shape[0]
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=(q_bs, kv_bs),
        mask_mod=_mask_mod_from_tables(*tables),
        seq_lengths=(n, n),
    )


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive float mask (0 where allowed, dtype min elsewhere), for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~mask, torch.finfo(dtype).min)
