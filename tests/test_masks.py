"""The attention rule against a brute-force reference written straight from the rule as the README states it."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from idlm.masks import SequenceLayout, compute_block_ids, dense_mask, flex_mask_mod, positions_from_mask


def reference_blocks(supervised: list[bool], positions: list[int], b: int, align: str) -> list[int]:
    """Block ids by a plain loop: 'sequence' = p // b; 'response' = restart at every supervision change."""
    if align == "sequence":
        return [p // b for p in positions]
    blocks, cur, offset = [], -1, 0
    for i, s in enumerate(supervised):
        if i == 0 or s != supervised[i - 1]:
            offset = 0
        if offset % b == 0:
            cur += 1
        blocks.append(cur)
        offset += 1
    return blocks


def reference_mask(valid: list[bool], supervised: list[bool], b: int, align: str) -> torch.Tensor:
    """The [2L, 2L] rule evaluated one (query, key) pair at a time."""
    L = len(valid)
    pos, count = [], 0
    for v in valid:
        pos.append(max(count, 0) if v else max(count - 1, 0))
        count += int(v)
    blk = reference_blocks(supervised, pos, b, align)
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q, k in itertools.product(range(2 * L), repeat=2):
        qn, kn = q < L, k < L
        qi, ki = q % L, k % L
        if qn and kn:
            ok = blk[ki] == blk[qi] and pos[ki] <= pos[qi]
        elif qn and not kn:
            ok = blk[ki] < blk[qi]
        elif not qn and kn:
            ok = False
        else:
            ok = pos[ki] <= pos[qi]
        out[q, k] = ok and (valid[ki] or q == k)
    return out


def random_row(rng: random.Random, L: int, prompt_len: int, pad: int, left_pad: bool, multi_turn: bool):
    """(valid, supervised) of one row: prompt, response (optionally a second turn), padding."""
    n_real = L - pad
    sup = [False] * prompt_len + [True] * (n_real - prompt_len)
    if multi_turn and n_real - prompt_len > 4:
        cut = prompt_len + rng.randint(1, n_real - prompt_len - 2)
        for i in range(cut, min(cut + 2, n_real)):
            sup[i] = False  # a user turn in the middle
    valid = [True] * n_real
    if left_pad:
        return [False] * pad + valid, [False] * pad + sup
    return valid + [False] * pad, sup + [False] * pad


CASES = [
    (L, N, align, seed)
    for L in (1, 2, 5, 9, 16)
    for N in (2, 3, 4, 5)
    for align in ("response", "sequence")
    for seed in range(3)
]


@pytest.mark.parametrize("L,N,align,seed", CASES)
def test_dense_mask_matches_brute_force(L, N, align, seed):
    rng = random.Random(hash((L, N, align, seed)) % 2**32)
    rows = []
    for _ in range(3):
        pad = rng.randint(0, L - 1) if L > 1 else 0
        prompt = rng.randint(0, L - pad)
        rows.append(random_row(rng, L, prompt, pad, rng.random() < 0.5, rng.random() < 0.5))
    valid = torch.tensor([r[0] for r in rows])
    sup = torch.tensor([r[1] for r in rows])
    positions = positions_from_mask(valid)
    layout = SequenceLayout(positions, compute_block_ids(sup, positions, N - 1, align), valid)
    got = dense_mask(layout)
    assert got.shape == (3, 1, 2 * L, 2 * L)
    for i, (v, s) in enumerate(rows):
        torch.testing.assert_close(got[i, 0], reference_mask(v, s, N - 1, align), rtol=0, atol=0)
        assert got[i, 0].any(dim=-1).all(), "every query must see at least one key (no NaN rows)"


def test_example_from_the_notes():
    """b = 2, L = 6, all supervised, sequence alignment: the worked example of the paper's rule."""
    valid = torch.ones(1, 6, dtype=torch.bool)
    positions = positions_from_mask(valid)
    layout = SequenceLayout(positions, compute_block_ids(valid, positions, 2, "sequence"), valid)
    m = dense_mask(layout)[0, 0].int()
    assert m[4].tolist() == [0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0]
    assert m[5].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]
    assert m[9].tolist() == [0] * 6 + [1, 1, 1, 1, 0, 0]


def test_clean_half_is_plain_causal():
    valid = torch.tensor([[True] * 7 + [False] * 3])
    sup = torch.tensor([[False] * 3 + [True] * 4 + [False] * 3])
    positions = positions_from_mask(valid)
    layout = SequenceLayout(positions, compute_block_ids(sup, positions, 3, "response"), valid)
    m = dense_mask(layout)[0, 0]
    L = 10
    clean = m[L:, L:]
    expected = torch.tril(torch.ones(L, L, dtype=torch.bool)) & valid[0][None, :]
    expected |= torch.eye(L, dtype=torch.bool)
    assert torch.equal(clean, expected)
    assert not m[L:, :L].any(), "x_0 never attends to x_t"


def test_response_blocks_start_at_response():
    sup = torch.tensor([[False, False, False, True, True, True, True, True]])
    valid = torch.ones_like(sup)
    blk = compute_block_ids(sup, positions_from_mask(valid), 2, "response")
    # prompt run [0,1,2] -> blocks 0,0,1 ; response run starts a fresh block at index 3
    assert blk.tolist() == [[0, 0, 1, 2, 2, 3, 3, 4]]


@pytest.mark.parametrize("align", ["response", "sequence"])
def test_flex_mask_mod_equals_dense(align):
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(7)
    L = 13
    rows = [random_row(rng, L, rng.randint(0, 6), rng.randint(0, 4), left, True) for left in (False, True)]
    valid = torch.tensor([r[0] for r in rows])
    sup = torch.tensor([r[1] for r in rows])
    positions = positions_from_mask(valid)
    layout = SequenceLayout(positions, compute_block_ids(sup, positions, 3, align), valid)
    flex = create_mask(flex_mask_mod(layout), 2, 1, 2 * L, 2 * L, device="cpu")
    assert torch.equal(flex, dense_mask(layout))


def test_compacted_rows_are_a_submatrix_of_the_full_mask():
    """With a subset of x_t rows (noisy_index), the mask is the full rule restricted to those rows."""
    valid = torch.tensor([[True] * 9 + [False] * 2, [False] * 1 + [True] * 10])
    sup = torch.tensor([[False] * 3 + [True] * 6 + [False] * 2, [False] * 5 + [True] * 6])
    positions = positions_from_mask(valid)
    layout = SequenceLayout(positions, compute_block_ids(sup, positions, 2, "response"), valid)
    full = dense_mask(layout)
    index = torch.tensor([[3, 4, 5, 6, 7, 8], [5, 6, 7, 8, 9, 10]])
    index_padded = torch.cat([index, torch.full((2, 1), -1)], dim=1)
    got = dense_mask(layout, index_padded)
    L, K = 11, 7
    for b in range(2):
        keep = index[b].tolist() + list(range(L, 2 * L))
        sub = full[b, 0][keep][:, keep]
        rows = list(range(K - 1)) + list(range(K, K + L))
        torch.testing.assert_close(got[b, 0][rows][:, rows], sub, rtol=0, atol=0)
        # the padding row sees only itself, and nobody sees it
        assert got[b, 0][K - 1].nonzero().flatten().tolist() == [K - 1]
        assert got[b, 0][:, K - 1].nonzero().flatten().tolist() == [K - 1]


# ---------------------------------------------------------------------------------------------------------------
# The flex BlockMask built from the closed form (idlm.masks.flex_block_mask)


def random_inputs(seed: int, B: int, L: int, N: int, align: str, compact: bool):
    """build_inputs on B random rows (prompt, response, optional user turn, left or right padding)."""
    from idlm.objective import build_inputs

    rng = random.Random(seed)
    rows = []
    for _ in range(B):
        pad = rng.randint(0, L - 1) if L > 1 else 0
        prompt = rng.randint(0, L - pad)
        rows.append(random_row(rng, L, prompt, pad, rng.random() < 0.5, rng.random() < 0.5))
    valid = torch.tensor([r[0] for r in rows])
    sup = torch.tensor([r[1] for r in rows])
    ids = torch.randint(0, 50, (B, L), generator=torch.Generator().manual_seed(seed))
    labels = torch.where(sup, ids, torch.full_like(ids, -100))
    return build_inputs(ids, labels, 99, N - 1, valid.long(), align, compact)


def block_sets(num: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """(num_blocks [B, H, R], indices [B, H, R, C]) -> which blocks are listed, as bool [B, H, R, cols]."""
    listed = torch.arange(idx.shape[-1]) < num[..., None]
    out = torch.zeros(*idx.shape[:-1], cols + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(listed, idx.long(), cols), True)
    return out[..., :cols]


def tables_of(bm, n: int, q_bs: int, kv_bs: int) -> dict[str, torch.Tensor]:
    nq, nkv = -(-n // q_bs), -(-n // kv_bs)
    return {
        "partial": block_sets(bm.kv_num_blocks, bm.kv_indices, nkv),
        "full": block_sets(bm.full_kv_num_blocks, bm.full_kv_indices, nkv),
        "partial_q": block_sets(bm.q_num_blocks, bm.q_indices, nq),
        "full_q": block_sets(bm.full_q_num_blocks, bm.full_q_indices, nq),
    }


def effective_mask(bm, n: int, q_bs: int, kv_bs: int) -> torch.Tensor:
    """What a block-sparse kernel computes: FULL tiles all allowed, PARTIAL tiles the mask_mod, others nothing."""
    from torch.nn.attention.flex_attention import create_mask

    t = tables_of(bm, n, q_bs, kv_bs)

    def expand(blocks):
        return blocks.repeat_interleave(q_bs, -2).repeat_interleave(kv_bs, -1)[..., :n, :n]

    per_element = create_mask(bm.mask_mod, bm.kv_indices.shape[0], 1, n, n, device="cpu")
    return expand(t["full"]) | (expand(t["partial"]) & per_element)


BLOCK_CASES = [
    (L, N, bs, align, compact, seed)
    for L, bs in ((1, 16), (7, 16), (33, 16), (64, 32), (100, (16, 32)), (90, (32, 16)), (150, 32), (61, 8))
    for N in (2, 3, 5)
    for align, compact in (("response", True), ("sequence", False), ("sequence", True))
    for seed in (0,)
] + [(L, 4, 16, "response", True, seed) for L in (47, 96) for seed in range(1, 6)]


@pytest.mark.parametrize("L,N,bs,align,compact,seed", BLOCK_CASES)
def test_block_mask_matches_create_block_mask(L, N, bs, align, compact, seed):
    """Same FULL and PARTIAL tiles (both directions) as torch's create_block_mask over the mask_mod, and the
    tiles with the mask_mod give exactly the dense rule."""
    from torch.nn.attention.flex_attention import create_block_mask

    from idlm.masks import flex_block_mask

    B = 1 + seed % 3
    inputs = random_inputs(hash((L, N, align, compact, seed)) % 2**32, B, L, N, align, compact)
    n = inputs.input_ids.shape[1]
    q_bs, kv_bs = (bs, bs) if isinstance(bs, int) else bs
    ours = flex_block_mask(inputs.layout, inputs.noisy_index, block_size=bs)
    ref = create_block_mask(flex_mask_mod(inputs.layout, inputs.noisy_index), B, None, n, n, device="cpu",
                            BLOCK_SIZE=bs)
    assert ours.seq_lengths == (n, n)
    assert tuple(ours.BLOCK_SIZE) == (q_bs, kv_bs)
    got, want = tables_of(ours, n, q_bs, kv_bs), tables_of(ref, n, q_bs, kv_bs)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(effective_mask(ours, n, q_bs, kv_bs), dense_mask(inputs.layout, inputs.noisy_index))


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("bs", [16, (8, 32)])
def test_block_counts_equal_dense_counts(compact, bs):
    """The per-tile counts from the intervals equal the dense rule summed per tile (tiles cut by the end
    count only the pairs that exist)."""
    from idlm.masks import _key_intervals, _tables_and_counts, block_counts

    inputs = random_inputs(11, 3, 70, 4, "response", compact)
    q_bs, kv_bs = (bs, bs) if isinstance(bs, int) else bs
    tables, _ = _tables_and_counts(inputs.layout, inputs.noisy_index, q_bs, kv_bs)
    assert _key_intervals(tables[1], tables[2], inputs.noisy_index >= 0) is not None, "closed-form path expected"
    dense = dense_mask(inputs.layout, inputs.noisy_index)[:, 0]
    n = dense.shape[-1]
    nq, nkv = -(-n // q_bs), -(-n // kv_bs)
    padded = torch.nn.functional.pad(dense, (0, nkv * kv_bs - n, 0, nq * q_bs - n))
    want = padded.reshape(3, nq, q_bs, nkv, kv_bs).sum((2, 4))
    assert torch.equal(block_counts(inputs.layout, inputs.noisy_index, bs), want)


def test_tile_missing_one_pair_is_partial():
    """A tile with all pairs allowed but one is PARTIAL. L = 47, N = 2, every x_t row kept, tiles of 16: the
    x_t tile at positions 16..31 against the x_0 tile at positions 1..16 misses only (pos 16, key pos 16)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from idlm.masks import block_counts, flex_block_mask
    from idlm.objective import build_inputs

    L = 47
    ids = torch.arange(L)[None] % 50
    inputs = build_inputs(ids, ids.clone(), 99, 1, None, "sequence", compact=False)
    counts = block_counts(inputs.layout, inputs.noisy_index, 16)
    assert int(counts[0, 1, 3]) == 16 * 16 - 1
    bm = flex_block_mask(inputs.layout, inputs.noisy_index, block_size=16)
    t = tables_of(bm, 2 * L, 16, 16)
    assert bool(t["partial"][0, 0, 1, 3]) and not bool(t["full"][0, 0, 1, 3])
    ref = create_block_mask(flex_mask_mod(inputs.layout, inputs.noisy_index), 1, None, 2 * L, 2 * L,
                            device="cpu", BLOCK_SIZE=16)
    want = tables_of(ref, 2 * L, 16, 16)
    assert all(torch.equal(t[key], want[key]) for key in want)


def test_block_mask_build_never_evaluates_the_rule(monkeypatch):
    """The closed-form build does not call the per-element rule (only the returned mask_mod does, later)."""
    import idlm.masks as masks

    inputs = random_inputs(3, 2, 120, 3, "response", True)

    def forbidden(*args, **kwargs):
        raise AssertionError("attention_rule evaluated while building the block mask")

    monkeypatch.setattr(masks, "attention_rule", forbidden)
    bm = masks.flex_block_mask(inputs.layout, inputs.noisy_index, block_size=32)
    assert bm.kv_num_blocks.shape == (2, 1, -(-inputs.input_ids.shape[1] // 32))


def test_non_monotone_layout_falls_back_exactly():
    """x_t rows out of order (no caller builds that) take the chunked fallback and still match torch."""
    from torch.nn.attention.flex_attention import create_block_mask

    from idlm.masks import _key_intervals, _tables_and_counts, flex_block_mask

    inputs = random_inputs(5, 2, 40, 3, "response", False)
    index = inputs.noisy_index.flip(1)
    index[1, :3] = -1  # padding rows first, too
    tables, _ = _tables_and_counts(inputs.layout, index, 16, 16)
    assert _key_intervals(tables[1], tables[2], index >= 0) is None
    n = index.shape[1] + 40
    ours = flex_block_mask(inputs.layout, index, block_size=16)
    ref = create_block_mask(flex_mask_mod(inputs.layout, index), 2, None, n, n, device="cpu", BLOCK_SIZE=16)
    got, want = tables_of(ours, n, 16, 16), tables_of(ref, n, 16, 16)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.slow
def test_compiled_flex_attention_with_block_mask_equals_sdpa():
    """CPU inductor's flex kernel honours the tile tables (FULL tiles skip the mask_mod): its output with our
    BlockMask equals SDPA with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from idlm.masks import flex_block_mask

    flex = torch.compile(flex_attention, dynamic=False)
    inputs = random_inputs(21, 2, 90, 3, "response", True)
    n = inputs.input_ids.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    bm = flex_block_mask(inputs.layout, inputs.noisy_index, block_size=32)
    assert int(bm.full_kv_num_blocks.sum()) > 0 and int(bm.kv_num_blocks.sum()) > 0, "both tile kinds exercised"
    mask = dense_mask(inputs.layout, inputs.noisy_index)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(flex(q, k, v, block_mask=bm), want, rtol=1e-5, atol=1e-5)
