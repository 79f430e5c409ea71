"""What the sampling half of one SGLang ISD decode step costs on a GPU, at Qwen3's vocabulary (docs/results/
serving_h200.md, "Sampled steps"): `idlm.sampling.process_logits` on the verify and draft rows (its top-k pass, and
the full-vocabulary sort it takes for a top-p row without top-k), the whole `ISDStateTable.commit` (sampled at the
paper's protocol and greedy), and beside them what SGLang's AR step spends on sampling one row per request (its
pytorch sampler, and flashinfer's joint top-k/top-p sampler where the bundle provides it).

Random bf16-rounded logits, N = 4 (7 rows per request); CUDA-event medians of --reps runs after a warm-up.

    python scripts/dev/sampled_step_cost.py [--batch 32 64] [--out FILE.json]
"""

# ruff: noqa: B023  (each lambda runs inside `timed` before the loop moves on)
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from idlm.inference.sglang_isd.config import ISDServeConfig
from idlm.inference.sglang_isd.stepper import ISDStateTable, SamplingView
from idlm.isd import verify_drafts, verify_point_drafts
from idlm.sampling import BatchHints, candidate_probs, candidates, process_logits

VOCAB = 151936
PAPER = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}


def timed(fn, reps: int) -> float:
    """Median ms of ``fn()`` over ``reps`` runs (CUDA events; wall time on a CPU), after three warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(times), 3)


def sglang_samplers():
    """SGLang's AR samplers from an installed SGLang (the device bundle), or {} without one."""
    found = {}
    try:
        from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch as torch_sampler

        found["pytorch"] = lambda probs, k, p: torch_sampler(probs, k, p, torch.zeros_like(p), False, None, None)
    except Exception as exc:  # noqa: BLE001 - any import failure just leaves the column out
        print(f"no SGLang pytorch sampler: {exc}")
    try:
        from flashinfer.sampling import top_k_top_p_sampling_from_probs

        found["flashinfer"] = lambda probs, k, p: top_k_top_p_sampling_from_probs(probs, k, p,
                                                                                   filter_apply_order="joint")
    except Exception as exc:  # noqa: BLE001
        print(f"no flashinfer sampler: {exc}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    vocab = args.vocab
    n, rows = args.stride, 2 * args.stride - 1
    ar = sglang_samplers()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__, "vocab": vocab, "stride": n,
               "protocol": PAPER, "ms": {}}
    for b in args.batch:
        gen = torch.Generator(device=dev).manual_seed(b)
        logits = (torch.randn(b * rows, vocab, generator=gen, device=dev) * 4).to(torch.bfloat16).float()
        t = torch.full((b,), PAPER["temperature"], device=dev)
        k = torch.full((b,), PAPER["top_k"], device=dev, dtype=torch.long)
        p = torch.full((b,), PAPER["top_p"], device=dev)
        hints = BatchHints.of(t.tolist(), k.tolist(), p.tolist(), vocab)
        no_k = BatchHints.of(t.tolist(), [0] * b, p.tolist(), vocab)
        three_d = logits.view(b, rows, vocab)
        m: dict[str, float] = {}
        m["process_logits 7 rows, top-k pass"] = timed(lambda: process_logits(three_d, t, k, p, hints), args.reps)
        m["process_logits 7 rows, top-p alone (full sort)"] = timed(
            lambda: process_logits(three_d, t, torch.zeros_like(k), p, no_k), args.reps)
        four = three_d[:, :n]
        m["process_logits 4 verify rows, top-k pass"] = timed(lambda: process_logits(four, t, k, p, hints), args.reps)
        m["of which: topk 50 of 4 rows"] = timed(lambda: torch.topk(four, PAPER["top_k"], dim=-1), args.reps)
        m["of which: logsumexp of 4 rows"] = timed(lambda: torch.logsumexp(four, -1), args.reps)
        probs4 = process_logits(four, t, k, p, hints)
        drafts = torch.randint(0, vocab, (b, n - 1), generator=gen, device=dev)
        u = torch.rand(b, n, device=dev, dtype=torch.float64, generator=gen)
        full = torch.full((b,), n - 1, device=dev)
        m["verify_drafts (argmax rule)"] = timed(
            lambda: verify_drafts(probs4, None, drafts, full, u[:, :-1], u[:, -1], "argmax"), args.reps)
        m["candidate_probs 4 verify rows (sparse p)"] = timed(lambda: candidate_probs(four, t, k, p, hints), args.reps)
        ids4, sparse4 = candidate_probs(four, t, k, p, hints)
        m["verify_point_drafts (argmax rule, sparse p)"] = timed(
            lambda: verify_point_drafts(ids4, sparse4, drafts, full, u[:, :-1], u[:, -1]), args.reps)
        c4 = candidates(four, t, k, hints)
        m["candidates 4 verify rows (the passes over V)"] = timed(lambda: candidates(four, t, k, hints), args.reps)
        if dev.type == "cuda":
            from idlm.inference.sglang_isd.verify_sampling import fused_verify

            m["fused_verify (one kernel, after candidates)"] = timed(
                lambda: fused_verify(c4, p, drafts, full, u[:, :-1], u[:, -1]), args.reps)
        configs = [("argmax", False), ("sample", False)] + ([("argmax", True)] if dev.type == "cuda" else [])
        for mode, fused in configs:
            cfg = ISDServeConfig(stride=n, draft_mode=mode, fused_verify=fused)
            state = ISDStateTable(b, cfg, 0, dev, vocab_size=vocab)
            slots = torch.arange(b, device=dev)
            state.on_prefill(slots, torch.ones(b, dtype=torch.long, device=dev))
            seq = torch.full((b,), 512, device=dev)
            step = state.build(slots, seq)
            sampling = SamplingView(t, k, p, hints)
            label = f"commit sampled ({mode} drafts{', fused verify' if fused else ''})"
            m[label] = timed(lambda: state.commit(slots, step, logits, seq, sampling), args.reps)
        m["commit greedy"] = timed(lambda: state.commit(slots, step, logits, seq, None), args.reps)
        one_row = logits.view(b, rows, vocab)[:, 0].contiguous()
        for name, sample in ar.items():
            m[f"SGLang AR sampler ({name}), 1 row"] = timed(
                lambda: sample(torch.softmax(one_row / t[:, None], -1), k.int(), p), args.reps)
        results["ms"][str(b)] = m
        print(f"batch {b}: " + json.dumps(m))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
