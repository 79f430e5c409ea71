"""Attention of an ISD verify step with the query heads of one KV head packed into one tile (Triton).

An ISD step gives every request R = 2N - 1 query rows after its committed prefix: causal attention over
[prefix | step rows]. SGLang's split-KV verify kernel runs one program per (request, query head, split), so each KV
head of the prefix is read once per query head (4 times for Qwen3's 32 / 8 heads). Here one program handles one
(request, KV head, split) and packs the G = H / H_kv query heads sharing that KV head with the R rows into one tile
of M = R * G rows (row m is step row m // G of query head kvh * G + m % G). The prefix is read once per KV head, as a
GQA decode kernel does, and the tile is dense enough for tensor cores (M = 28 for N = 4, G = 4, padded to 32).

Two kernels, both CUDA-graph safe (grid and split count depend on shapes only):

* `_prefix_partial`: per (request, KV head, split of the prefix), the tile's softmax partial: its max-shifted sums
  (``acc`` [M, D] divided by ``l``) and log-sum-exp, online over blocks of the split's prefix keys;
* `_combine_with_steps`: per (request, KV head), the causal block of the R step rows (key j is visible to row r when
  j <= r) merged with every split's partial by log-sum-exp, written to the output rows.

Inputs follow SGLang's ``extend_attention_fwd`` layout (q [T, H, D] with T = B * R, the step rows' k / v [T, H_kv,
D], the paged KV buffers, qo_indptr / kv_indptr / kv_indices), so `isd_verify_attention` can stand in for it on
ISD's shape (see `compat.gqa_verify_fwd`). `reference_verify_attention` is the plain PyTorch definition the tests
compare with.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # prefix keys per inner iteration


@triton.jit
def _q_tile(Q, b, kvh, stride_qt, stride_qh, R: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The packed query tile of (request b, KV head kvh): row m is step row m // G of query head kvh * G + m % G.
    Returns (q [BLOCK_M, BLOCK_D], row_ok, token row, query head), each of the last three [BLOCK_M]."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < R * G
    tok = b * R + offs_m // G
    head = kvh * G + offs_m % G
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    return q, row_ok, tok, head


@triton.jit
def _prefix_partial(Q, K_buf, V_buf, kv_indptr, kv_indices, Part_out, Part_lse, sm_scale,
                    stride_qt, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                    R: tl.constexpr, G: tl.constexpr, H_KV: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q, _, _, _ = _q_tile(Q, b, kvh, stride_qt, stride_qh, R, G, D, BLOCK_M, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    kv_start = tl.load(kv_indptr + b)
    prefix = tl.load(kv_indptr + b + 1) - kv_start
    chunk = (prefix + S - 1) // S
    lo = s * chunk
    hi = tl.minimum(lo + chunk, prefix)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        loc = tl.load(kv_indices + kv_start + offs_n, mask=n_ok, other=0)
        k = tl.load(K_buf + loc[None, :] * stride_kb + kvh * stride_kh + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        qk = tl.dot(q, k.to(q.dtype)) * sm_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V_buf + loc[:, None] * stride_vb + kvh * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    base = ((b * H_KV + kvh) * S + s) * BLOCK_M
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(Part_out + (base + offs_m)[:, None] * BLOCK_D + offs_d[None, :], out)
    tl.store(Part_lse + base + offs_m, lse)


@triton.jit
def _combine_with_steps(Q, K_ext, V_ext, Out, Part_out, Part_lse, sm_scale,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                        R: tl.constexpr, G: tl.constexpr, H_KV: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    d_ok = offs_d < D
    q, row_ok, tok, head = _q_tile(Q, b, kvh, stride_qt, stride_qh, R, G, D, BLOCK_M, BLOCK_D)
    r_of_m = offs_m // G
    j_ok = offs_r < R
    k = tl.load(K_ext + (b * R + offs_r)[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_R]
    qk = tl.dot(q, k.to(q.dtype)) * sm_scale
    visible = j_ok[None, :] & (offs_r[None, :] <= r_of_m[:, None])
    qk = tl.where(visible, qk, float("-inf"))
    m_i = tl.max(qk, 1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.exp(qk - m_safe[:, None])
    l_i = tl.sum(p, 1)
    v = tl.load(V_ext + (b * R + offs_r)[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.dot(p.to(v.dtype), v)  # [BLOCK_M, BLOCK_D], unnormalised, shifted by m_i
    # log-sum-exp merge of the split partials into (m_i, l_i, acc)
    for s in range(S):
        base = ((b * H_KV + kvh) * S + s) * BLOCK_M
        lse_s = tl.load(Part_lse + base + offs_m)
        out_s = tl.load(Part_out + (base + offs_m)[:, None] * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp(m_i - m_safe)
        a_s = tl.exp(lse_s - m_safe)
        acc = acc * a_old[:, None] + out_s * a_s[:, None]
        l_i = l_i * a_old + a_s
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def num_splits(batch: int, kv_heads: int, target_programs: int = 512, max_splits: int = 16) -> int:
    """Prefix splits per (request, KV head): enough programs to fill the GPU at small batches (a power of two,
    1..max_splits). From shapes only, so a captured CUDA graph keeps its value."""
    s = 1
    while s < max_splits and batch * kv_heads * s < target_programs:
        s *= 2
    return s


def isd_verify_attention(q: torch.Tensor, k_ext: torch.Tensor, v_ext: torch.Tensor, o: torch.Tensor,
                         k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv_indptr: torch.Tensor,
                         kv_indices: torch.Tensor, rows: int, sm_scale: float, splits: int | None = None) -> None:
    """o[T, H, D] = causal attention of the step rows over [prefix | step rows], every request with ``rows`` rows.

    q: [T, H, D], T = B * rows; k_ext / v_ext: [T, H_kv, D] (the step rows' keys and values); k_buffer / v_buffer:
    [pool, H_kv, D]; kv_indptr: [B + 1]; kv_indices: pool slots of every request's prefix, concatenated.
    """
    T, H, D = q.shape
    h_kv = k_ext.shape[1]
    if T % rows or H % h_kv or v_ext.shape[2] != D or k_buffer.shape[2] != D:
        raise ValueError(f"isd_verify_attention: unsupported shapes q {tuple(q.shape)}, k {tuple(k_ext.shape)}, "
                         f"v {tuple(v_ext.shape)}, rows {rows}")
    batch, group = T // rows, H // h_kv
    S = splits or num_splits(batch, h_kv)
    block_m = max(16, triton.next_power_of_2(rows * group))
    block_d = max(16, triton.next_power_of_2(D))
    block_r = max(16, triton.next_power_of_2(rows))
    part_out = torch.empty(batch * h_kv * S * block_m, block_d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch * h_kv * S * block_m, dtype=torch.float32, device=q.device)
    _prefix_partial[(batch, h_kv, S)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, part_out, part_lse, sm_scale,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        R=rows, G=group, H_KV=h_kv, S=S, D=D, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=BLOCK_N)
    _combine_with_steps[(batch, h_kv)](
        q, k_ext, v_ext, o, part_out, part_lse, sm_scale,
        q.stride(0), q.stride(1), k_ext.stride(0), k_ext.stride(1), v_ext.stride(0), v_ext.stride(1),
        o.stride(0), o.stride(1),
        R=rows, G=group, H_KV=h_kv, S=S, D=D, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r)


def reference_verify_attention(q, k_ext, v_ext, k_buffer, v_buffer, kv_indptr, kv_indices, rows: int,
                               sm_scale: float) -> torch.Tensor:
    """The definition, in float64: request b's row r attends to its prefix and to step rows 0..r."""
    T, H, D = q.shape
    group = H // k_ext.shape[1]
    out = torch.empty(T, H, D, dtype=torch.float64)
    for b in range(T // rows):
        slots = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long()
        keys = torch.cat([k_buffer[slots], k_ext[b * rows:(b + 1) * rows]]).double()  # [P + R, H_kv, D]
        vals = torch.cat([v_buffer[slots], v_ext[b * rows:(b + 1) * rows]]).double()
        prefix = len(slots)
        for r in range(rows):
            qr = q[b * rows + r].double()  # [H, D]
            kr = keys[:prefix + r + 1].repeat_interleave(group, dim=1)  # [n, H, D]
            vr = vals[:prefix + r + 1].repeat_interleave(group, dim=1)
            w = torch.softmax(torch.einsum("hd,nhd->hn", qr, kr) * sm_scale, dim=-1)
            out[b * rows + r] = torch.einsum("hn,nhd->hd", w, vr)
    return out
