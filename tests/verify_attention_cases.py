"""Cases for the GQA-packed ISD verify attention kernel (inference/sglang_isd/verify_attention.py), shared by the CPU
test (Triton interpreter, in a subprocess: triton picks interpreted or compiled mode when it is first imported) and
the GPU test. ``python -m tests.verify_attention_cases [cuda]`` runs them all and prints one line per case."""

from __future__ import annotations

import sys

import torch

CASES = [
    # prefix lengths, rows (2N - 1), heads, kv heads, head dim, splits (None: by shape)
    ([5, 130, 1], 7, 8, 2, 32, 4),  # N = 4, GQA 4, a split longer than BLOCK_N, one-token prefix (empty splits)
    ([70, 3], 5, 4, 4, 32, 2),  # N = 3, no GQA
    ([200], 3, 16, 2, 48, None),  # N = 2, GQA 8 (tile 24 -> 32), head_dim not a power of two, split count by shape
    ([64, 64, 9, 300], 7, 4, 1, 16, 16),  # MQA, more splits than some prefixes have keys
]


def make_case(prefix, rows, heads, kv_heads, dim, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    pool = sum(prefix) + 50
    kb, vb = torch.randn(pool, kv_heads, dim, generator=g), torch.randn(pool, kv_heads, dim, generator=g)
    indptr = torch.tensor([0, *torch.tensor(prefix).cumsum(0).tolist()], dtype=torch.int32)
    indices = torch.randperm(pool, generator=g)[: sum(prefix)]  # prefixes live anywhere in the paged pool
    T = len(prefix) * rows
    q = torch.randn(T, heads, dim, generator=g) * 2  # sharper softmax than unit scale
    ke, ve = torch.randn(T, kv_heads, dim, generator=g), torch.randn(T, kv_heads, dim, generator=g)
    floats = [t.to(device, dtype) for t in (q, ke, ve, kb, vb)]
    return (*floats, indptr.to(device), indices.to(device))


def check_definition(va, device="cpu", dtype=torch.float32, tol=2e-5) -> list[str]:
    lines = []
    for prefix, rows, heads, kv_heads, dim, splits in CASES:
        q, ke, ve, kb, vb, indptr, indices = make_case(prefix, rows, heads, kv_heads, dim, device=device, dtype=dtype)
        o = torch.full_like(q, float("nan"))
        scale = dim**-0.5
        va.isd_verify_attention(q, ke, ve, o, kb, vb, indptr, indices, rows, scale, splits=splits)
        cpu = [t.cpu() for t in (q, ke, ve, kb, vb, indptr, indices)]
        want = va.reference_verify_attention(*cpu[:5], cpu[5], cpu[6], rows, scale)
        err = (o.cpu().double() - want).abs().max().item()
        assert err <= tol, f"case {prefix} rows {rows} heads {heads}/{kv_heads} dim {dim}: max error {err:.2e}"
        lines.append(f"ok prefix={prefix} rows={rows} heads={heads}/{kv_heads} dim={dim} max_err={err:.1e}")
    return lines


def check_causal(va, device="cpu") -> str:
    """Changing step row j's key/value changes rows >= j of that request only."""
    rows = 7
    q, ke, ve, kb, vb, indptr, indices = make_case([20, 33], rows, 8, 2, 32, seed=1, device=device)
    o1, o2 = torch.empty_like(q), torch.empty_like(q)
    va.isd_verify_attention(q, ke, ve, o1, kb, vb, indptr, indices, rows, 0.2, splits=2)
    j = 3
    ke2, ve2 = ke.clone(), ve.clone()
    ke2[rows + j] += 1.0  # request 1, step row j
    ve2[rows + j] -= 1.0
    va.isd_verify_attention(q, ke2, ve2, o2, kb, vb, indptr, indices, rows, 0.2, splits=2)
    assert torch.equal(o1[: rows + j], o2[: rows + j]), "rows before j (and request 0) changed"
    assert not torch.allclose(o1[rows + j :], o2[rows + j :]), "rows from j on did not change"
    return "ok causal step rows"


def main() -> int:
    from idlm.inference.sglang_isd import verify_attention as va

    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    # float32 inputs: tl.dot runs in TF32 on a GPU (10-bit mantissa), hence the looser tolerance there
    lines = check_definition(va, device, tol=2e-5 if device == "cpu" else 5e-3) + [check_causal(va, device)]
    if device != "cpu":
        lines += [f"bf16 {line}" for line in check_definition(va, device, torch.bfloat16, tol=3e-2)]
    for line in lines:
        print(line)
    assert va.num_splits(1, 8) == 16 and va.num_splits(8, 8) == 8 and va.num_splits(64, 8) == 1
    print("ok split counts")
    q, ke, ve, kb, vb, indptr, indices = make_case([4], 3, 6, 4, 16, device=device)  # 6 heads over 4 KV heads
    try:
        va.isd_verify_attention(q, ke, ve, torch.empty_like(q), kb, vb, indptr, indices, 3, 0.25)
    except ValueError as exc:
        assert "unsupported shapes" in str(exc)
        print("ok shapes refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
