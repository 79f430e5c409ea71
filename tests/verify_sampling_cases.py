"""Cases for the fused sampled verification kernel (inference/sglang_isd/verify_sampling.py) against its PyTorch
definition, shared by the CPU test (Triton's interpreter, in a subprocess: triton picks interpreted or compiled mode
when it is first imported) and the GPU test. ``python -m tests.verify_sampling_cases [cuda]`` runs them all and
prints one line per case; exit status 1 on any difference.

For the same uniforms the kernel must return the reference's accepted lengths and next tokens exactly; the
reference (`filtered_probs` + `idlm.isd.verify_point_drafts`) is itself tested for exactness in tests/test_isd.py, so
equality on many draws carries its distribution over. The inputs are random, so a uniform could in principle land
within float32 rounding of a threshold; the seeds are fixed and such a draw has a chance of about 1e-7 per decision.
"""

from __future__ import annotations

import sys

import torch

from idlm.sampling import BatchHints, candidates

VOCAB = 600


def make_case(batch: int, k_max: int, temps: list[float], top_ks: list[int], top_ps: list[float], seed: int,
              draft_argmax: float = 0.7, sharp: float = 3.0, device: str = "cpu"):
    """Random verify-row logits [B, K + 1, V] (some rows sharp), drafts that are the previous row's argmax with
    probability ``draft_argmax`` (else a random token), random draft counts, and uniforms."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.arange(batch) % len(temps)
    temp = torch.tensor(temps)[pick]
    top_k = torch.tensor(top_ks)[pick]
    top_p = torch.tensor(top_ps)[pick]
    logits = torch.randn(batch, k_max + 1, VOCAB, generator=g) * (1 + sharp * torch.rand(batch, k_max + 1, 1,
                                                                                          generator=g))
    argmax = logits.argmax(-1)[:, :k_max]
    random_tok = torch.randint(0, VOCAB, (batch, k_max), generator=g)
    drafts = torch.where(torch.rand(batch, k_max, generator=g) < draft_argmax, argmax, random_tok)
    num_drafts = torch.randint(0, k_max + 1, (batch,), generator=g)
    u = torch.rand(batch, k_max + 1, generator=g)
    hints = BatchHints.of(temp.tolist(), top_k.tolist(), top_p.tolist(), VOCAB)
    c = candidates(logits.to(device), temp.to(device), top_k.to(device), hints)
    return (c, top_p.to(device), drafts.to(device), num_drafts.to(device), u[:, :k_max].to(device),
            u[:, k_max].to(device))


CASES = {
    # name: (batch, K, temperatures, top-ks, top-ps, seed, extra)
    "paper protocol": (256, 3, [1.0], [50], [0.95], 0, {}),
    "mixed rows (greedy, top-k only, tight top-p)": (192, 3, [1.0, 0.0, 0.7, 1.3, 1.0], [50, 50, 20, 5, 1],
                                                     [0.95, 1.0, 1.0, 0.5, 1.0], 1, {}),
    "every draft the argmax, sharp rows (bonus rows)": (128, 3, [0.5], [50], [0.95], 2,
                                                        {"draft_argmax": 1.0, "sharp": 12.0}),
    "N = 2": (64, 1, [1.0], [50], [0.95], 3, {}),
    "N = 8, width 64": (64, 7, [1.0], [64], [0.9], 4, {}),
}


def run(device: str = "cpu") -> int:
    from inference.sglang_isd.verify_sampling import fused_verify, reference_verify

    bad = 0
    for name, (batch, k_max, temps, top_ks, top_ps, seed, extra) in CASES.items():
        args = make_case(batch, k_max, temps, top_ks, top_ps, seed, device=device, **extra)
        want = reference_verify(*args)
        got = fused_verify(*args)
        same = [(w.cpu() == g_.cpu()).all().item() for w, g_ in zip(want, got)]
        accepted = want[0].float().mean().item()
        if all(same):
            print(f"ok {name}: {batch} requests, mean accepted {accepted:.2f}")
        else:
            bad += 1
            diff = (want[0].cpu() != got[0].cpu()) | (want[1].cpu() != got[1].cpu())
            print(f"FAIL {name}: {int(diff.sum())} of {batch} differ (accepted {same[0]}, next {same[1]})")
    # no drafts at all: the next token is a plain sample of row 0
    c, top_p, drafts, _, ua, us = make_case(32, 3, [1.0], [50], [0.95], 5, device=device)
    none = torch.zeros(32, dtype=torch.long, device=device)
    want, got = reference_verify(c, top_p, drafts, none, ua, us), fused_verify(c, top_p, drafts, none, ua, us)
    ok = all((w.cpu() == g_.cpu()).all().item() for w, g_ in zip(want, got)) and int(got[0].sum()) == 0
    print(("ok" if ok else "FAIL") + " no drafts")
    bad += not ok
    try:
        fused_verify(c, top_p, drafts[:, :2], none, ua[:, :2], us)
        print("FAIL shapes refused")
        bad += 1
    except ValueError:
        print("ok shapes refused")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
