"""The sampled ISD verification of argmax drafts as one Triton kernel, on p in sparse form.

After the passes over the vocabulary (`idlm.sampling.candidates`: temperature, one top-k of width max k, the
log-sum-exp), what is left of a sampled ISD step with argmax drafts is small: per request K + 1 rows of W candidates
(W = 50 under the paper's protocol). In PyTorch (`idlm.sampling.filtered_probs`, then `idlm.isd.verify_point_drafts`)
that is some thirty kernel launches of a few thousand numbers each, which cost more than the passes over V
(docs/results/serving_h200.md, "Sampled steps"). Here one program per request does all of it:

* each verify row's cut: keep the first ``keep_k`` candidates whose preceding mass, in softmax(logits / T), is at
  most ``top_p``; renormalise;
* drafts in order: accept draft j with probability p_j(x_j) (u_j < p_j(x_j)), stop at the first rejection;
* the next token from row ``accepted``: p there, without the rejected draft when one was rejected (renormalised),
  by inverse CDF with the request's last uniform, the candidates in their order.

That is `verify_point_drafts`' rule on `filtered_probs`' distribution, so the output has its distribution and, for
the same uniforms, its values (up to float32 rounding at a threshold: the CDF is summed in float64 as in
`idlm.sampling.sample_from_probs`). `reference_verify` is that PyTorch composition; the tests compare the two in
Triton's interpreter (tests/test_verify_sampling.py) and compiled (tests/gpu/test_verify_sampling_gpu.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from idlm.isd import verify_point_drafts
from idlm.sampling import Candidates, filtered_probs


@triton.jit
def _row_probs(SCALED, LSE, b, r, R, W, keep_k, top_p, BLOCK_W: tl.constexpr):
    """Row r of request b: the cut and renormalised candidate probabilities [BLOCK_W] (0 past W and the cut)."""
    offs = tl.arange(0, BLOCK_W)
    inside = offs < W
    v = tl.load(SCALED + (b * R + r) * W + offs, mask=inside, other=float("-inf"))
    probs = tl.exp(v - tl.load(LSE + b * R + r))
    probs = tl.where(inside, probs, 0.0)
    before = tl.cumsum(probs, axis=0) - probs
    cut = tl.where(top_p >= 1.0, float("inf"), top_p)  # top_p >= 1: off
    keep = inside & (offs < keep_k) & (before <= cut)
    probs = tl.where(keep, probs, 0.0)
    return probs / tl.sum(probs, axis=0)


@triton.jit
def _verify_kernel(SCALED, IDS, LSE, KEEP_K, TOP_P, DRAFTS, NUM_DRAFTS, U_ACCEPT, U_SAMPLE, ACCEPTED, NEXT,
                   R, W, K, KS, BLOCK_W: tl.constexpr):
    # R rows of W candidates per request; K drafts, stored with row stride KS (>= 1 even when K = 0)
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK_W)
    inside = offs < W
    keep_k = tl.load(KEEP_K + b)
    top_p = tl.load(TOP_P + b)
    num_drafts = tl.load(NUM_DRAFTS + b)
    accepted = num_drafts * 0
    going = num_drafts > 0
    for r in range(0, K):
        probs = _row_probs(SCALED, LSE, b, r, R, W, keep_k, top_p, BLOCK_W)
        ids = tl.load(IDS + (b * R + r) * W + offs, mask=inside, other=-1)
        draft = tl.load(DRAFTS + b * KS + r)
        p_x = tl.sum(tl.where(ids == draft, probs, 0.0), axis=0)
        going = going & (r < num_drafts) & (tl.load(U_ACCEPT + b * KS + r) < p_x)
        accepted += going.to(accepted.dtype)
    probs = _row_probs(SCALED, LSE, b, accepted, R, W, keep_k, top_p, BLOCK_W)
    ids = tl.load(IDS + (b * R + accepted) * W + offs, mask=inside, other=-1)
    rejected = accepted < num_drafts
    # the rejected draft (row `accepted`'s own draft) leaves the row; a row with no other mass keeps p (as normalize)
    x = tl.load(DRAFTS + b * KS + tl.minimum(accepted, KS - 1), mask=rejected, other=-1)
    without = tl.where(ids == x, 0.0, probs)
    total = tl.sum(without, axis=0)
    probs = tl.where(rejected & (total > 0), without / tl.where(total > 0, total, 1.0), probs)
    cdf = tl.cumsum(probs.to(tl.float64), axis=0)
    target = tl.load(U_SAMPLE + b).to(tl.float64) * tl.sum(probs.to(tl.float64), axis=0)
    pick = tl.sum(((cdf <= target) & inside).to(tl.int32), axis=0)
    last = tl.max(tl.where(probs > 0, offs, -1), axis=0)  # u * total can round up to total
    pick = tl.minimum(pick, last)
    tl.store(ACCEPTED + b, accepted.to(tl.int64))
    tl.store(NEXT + b, tl.load(IDS + (b * R + accepted) * W + pick))


def fused_verify(c: Candidates, top_p: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                 accept_uniforms: torch.Tensor, sample_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_verify` in one kernel launch.

    c: `candidates` of the verify rows, ids / scaled [B, K + 1, W], lse [B, K + 1, 1], keep_k [B, 1, 1].
    top_p: [B]. drafts: [B, K]. num_drafts: [B]. accept_uniforms [B, K], sample_uniforms [B] in [0, 1).
    Returns (accepted_len [B] long, next_token [B] long)."""
    batch, rows, width = c.scaled.shape
    k_max = drafts.shape[1]
    if rows != k_max + 1:
        raise ValueError(f"candidates have {rows} rows per request, drafts {k_max}: expected {k_max + 1}")
    device = c.scaled.device
    f32 = dict(device=device, dtype=torch.float32)
    accepted = torch.empty(batch, device=device, dtype=torch.long)
    nxt = torch.empty(batch, device=device, dtype=torch.long)
    if batch == 0:
        return accepted, nxt
    drafts_arg = drafts.to(device=device, dtype=torch.long).contiguous()
    if k_max == 0:  # no draft slots: one dummy column keeps the kernel's loads in bounds (the loop runs 0 times)
        drafts_arg = torch.zeros(batch, 1, device=device, dtype=torch.long)
        accept_uniforms = torch.zeros(batch, 1, **f32)
    _verify_kernel[(batch,)](
        c.scaled.to(torch.float32).contiguous(), c.ids.contiguous(), c.lse.to(torch.float32).contiguous(),
        c.keep_k.reshape(batch).to(device=device, dtype=torch.int32).contiguous(),
        torch.as_tensor(top_p, **f32).expand(batch).contiguous(), drafts_arg,
        num_drafts.to(device=device, dtype=torch.int32).contiguous(),
        accept_uniforms.to(**f32).contiguous(), sample_uniforms.to(**f32).contiguous(), accepted, nxt,
        rows, width, k_max, max(k_max, 1), BLOCK_W=triton.next_power_of_2(width))
    return accepted, nxt


def reference_verify(c: Candidates, top_p: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                     accept_uniforms: torch.Tensor, sample_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch definition: `filtered_probs`, then `verify_point_drafts`."""
    return verify_point_drafts(c.ids, filtered_probs(c, top_p), drafts, num_drafts, accept_uniforms,
                               sample_uniforms)
