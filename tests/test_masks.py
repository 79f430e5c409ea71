"""The attention rule against a brute-force reference written straight from DESIGN.md."""

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
