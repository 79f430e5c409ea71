"""GPU check of ISD under SGLang (run by scripts/dev/sglang_gpu_check.sh; about 10 minutes on an H100).

1. correctness: a small Qwen3-shaped I-DLM checkpoint, trained for a few seconds on a synthetic language so that its
   greedy choices are not bf16 coin flips; SGLang ISD (N = 4, started with the paper's --dllm-algorithm spelling)
   vs the reference engine (same weights, bf16, CUDA) vs SGLang AR, greedy, 50 prompts sent as one batch
   (continuous batching, CUDA graphs); each difference is explained by the top-2 logit gap of the fp32 reference at
   the first differing token (a bf16 near-tie) or flagged. Also: a sampled request, a bad request
   and a client that disconnects mid-stream leave the server serving.
2. speed (if time allows): Qwen3-8B-shaped dummy weights, ISD N = 4 vs SGLang AR, C = 1, 8, 32, 64, with
   `idlm bench throughput --api sglang`; docs/results/serving_h100.json and .md into $OUT. With --backends A,B
   (IDLM_SGLANG_BACKENDS) an ISD and an AR server per attention backend, all timed in the same run, and
   docs/results/serving_backends.{json,md}: each ISD backend's step against each AR backend's and against the
   faster AR at each C (`backend_ratios`), greedy and, with BENCH_SAMPLED, sampled; the step-ratio checks use the
   faster ISD backend against the faster AR one (issue targets: `STEP_RATIO_TARGETS`).

All four servers start at once (start-ups dominate the budget); KV pools are capped with --max-total-tokens and
--mem-fraction-static is set so that concurrent memory profiling cannot starve one server (docs/serving.md).
Prints one summary block last and writes $OUT/sglang_gpu_check.json. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from idlm.inference.sglang_isd.config import SGLANG_VERSION  # noqa: E402
from idlm.inference.sglang_isd.testing import (  # noqa: E402
    SGLangServer,
    build_random_gated_lora,
    build_tiny_idlm,
    decode_tpf,
    generate,
    isd_flags,
    output_ids,
    paper_isd_flags,
    random_prompts,
    server_info,
    write_dummy_qwen3_8b,
)

T0 = time.monotonic()
# BENCH_SAMPLED="0.6,0.95,20": also time both 8B servers with sampled requests (temperature, top_p, top_k)
SAMPLED = tuple(float(x) if i < 2 else int(x) for i, x in enumerate(os.environ["BENCH_SAMPLED"].split(","))) \
    if os.environ.get("BENCH_SAMPLED") else None
SUMMARY: list[str] = []
REPORT: dict = {"checks": {}, "errors": []}
# ISD step / AR step at the paper's shape on one H200, against the faster AR backend (greedy, and sampled at the
# paper's protocol T 1.0, top-p 0.95, top-k 50)
STEP_RATIO_TARGETS = {"greedy": {32: 1.35, 64: 1.75}, "sampled": {32: 1.40, 64: 1.80}}


def elapsed() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def check(name: str, ok: bool, detail: str) -> bool:
    REPORT["checks"][name] = {"ok": bool(ok), "detail": detail}
    SUMMARY.append(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    say(SUMMARY[-1])
    return ok


# ------------------------------------------------------------------------------------------------- correctness
def reference_outputs(ckpt: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    import torch

    from idlm.inference.engine import ISDEngine, SamplingParams

    engine = ISDEngine.from_pretrained(str(ckpt), stride=4, device="cuda", dtype="bfloat16", max_batch_size=16)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    del engine
    torch.cuda.empty_cache()
    return [o.token_ids for o in outs]


def explain(ckpt: Path, prompt: list[int], a: list[int], b: list[int]) -> tuple[str, bool]:
    """Where two greedy outputs first differ, and the fp32 reference's top-2 logit gap there."""
    import torch
    from transformers import AutoModelForCausalLM

    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    model = getattr(explain, "_model", None)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).cuda().eval()
        explain._model = model
    with torch.no_grad():
        logits = model(torch.tensor([prompt + a[:i]], device="cuda")).logits[0, -1]
    top = logits.topk(2)
    gap = float(top.values[0] - top.values[1])
    tie = gap < 0.05  # bf16 logits carry ~3 significant digits: a gap this small can flip the argmax
    return f"token {i}: {a[i] if i < len(a) else None} vs {b[i] if i < len(b) else None}, fp32 top-2 gap " \
           f"{gap:.4f}{' (bf16 near-tie)' if tie else ' (NOT a near-tie)'}", tie


def compare(name: str, ckpt: Path, prompts, got, want, need: float = 0.95) -> bool:
    same = sum(g == w for g, w in zip(got, want))
    notes, unexplained = [], 0
    for k, (p, g, w) in enumerate(zip(prompts, got, want)):
        if g != w:
            text, tie = explain(ckpt, p, g, w)
            unexplained += not tie
            notes.append(f"prompt {k}: {text}")
    REPORT.setdefault("differences", {})[name] = notes
    for n in notes:
        say(f"  {name}: {n}")
    frac = same / len(prompts)
    return check(name, frac >= need and unexplained == 0,
                 f"{same}/{len(prompts)} identical ({frac:.0%}; need {need:.0%}), {len(notes) - unexplained} "
                 f"differences explained by bf16 near-ties, {unexplained} unexplained")


def robustness(server: SGLangServer, vocab: int) -> None:
    import httpx

    ok_bad = False
    try:
        r = httpx.post(f"{server.url}/generate", json={"input_ids": [5, 3],
                       "sampling_params": {"max_new_tokens": 4, "top_p": 2.0}}, timeout=60, trust_env=False)
        ok_bad = 400 <= r.status_code < 500
        detail = f"top_p=2.0 -> HTTP {r.status_code} {r.text[:120]!r}"
    except httpx.HTTPError as exc:
        detail = f"top_p=2.0 -> {type(exc).__name__}"
    try:  # disconnect after the first streamed chunk
        with httpx.stream("POST", f"{server.url}/generate", json={"input_ids": [5, 6, 7], "stream": True,
                          "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}, timeout=60,
                          trust_env=False) as resp:
            for _ in resp.iter_lines():
                break
    except httpx.HTTPError:
        pass
    time.sleep(1)
    after = generate(server.url, [[9, 8, 7]], 8)
    alive = server.alive() and len(output_ids(after[0])) == 8
    check("isd_survives_bad_request_and_disconnect", ok_bad and alive,
          f"{detail}; server {'serves' if alive else 'DOES NOT serve'} afterwards")


def sampled_smoke(server: SGLangServer) -> None:
    res = generate(server.url, [[11, 12, 13]] * 4, 24, temperature=0.8, top_p=0.9, top_k=50)
    lens = [len(output_ids(r)) for r in res]
    distinct = len({tuple(output_ids(r)) for r in res})
    check("isd_sampled_requests", all(n == 24 for n in lens),
          f"4 sampled requests (T 0.8, top_p 0.9, top_k 50): lengths {lens}, {distinct} distinct outputs")


def phase_correctness(tiny: Path, vocab: int, isd: SGLangServer, ar: SGLangServer, timeout: float,
                      risd: SGLangServer | None = None) -> None:
    prompts = random_prompts(50, 10, 380, 4, 40, seed=1)
    max_new = 48
    say("reference engine (bf16, CUDA) on 50 prompts")
    ref = reference_outputs(tiny, prompts, max_new)
    for s in (isd, ar):
        say(f"waiting for {s.name}")
        s.wait_ready(timeout)
        say(f"{s.name} ready after {s.ready_s:.0f} s")
    info = server_info(isd.url)
    check("isd_paper_spelling_translated", info.get("speculative_algorithm") == "ISD"
          and int(info.get("speculative_num_draft_tokens") or 0) == 7,
          f"--dllm-algorithm IDLMBlockN -> speculative_algorithm={info.get('speculative_algorithm')}, "
          f"num_draft_tokens={info.get('speculative_num_draft_tokens')}, dllm_algorithm={info.get('dllm_algorithm')}")
    want = REPORT.get("attention_backend", "triton")
    got_backend = {isd.name: info.get("attention_backend"), ar.name: server_info(ar.url).get("attention_backend")}
    check("attention_backend_as_asked", all(b == want for b in got_backend.values()),
          f"servers report {got_backend} (asked: {want})")
    isd_res = generate(isd.url, prompts, max_new)
    ar_res = generate(ar.url, prompts, max_new)
    got = [output_ids(r) for r in isd_res]
    ar_out = [output_ids(r) for r in ar_res]
    tpfs = [t for t in (decode_tpf(r) for r in isd_res) if t is not None]
    REPORT["tiny_tpf_mean"] = sum(tpfs) / len(tpfs) if tpfs else None
    check("isd_tpf_reported", bool(tpfs) and all(1.0 <= t <= 4.0 for t in tpfs),
          f"mean TPF {REPORT['tiny_tpf_mean']} over {len(tpfs)} requests (N = 4)")
    compare("sglang_isd_vs_reference_engine", tiny, prompts, got, ref)
    compare("sglang_isd_vs_sglang_ar", tiny, prompts, got, ar_out)
    compare("sglang_ar_vs_reference_engine", tiny, prompts, ar_out, ref)
    if risd is not None:  # R-ISD: the same weights as a base model plus a random gated LoRA on the MASK rows
        say(f"waiting for {risd.name}")
        risd.wait_ready(timeout)
        risd_res = generate(risd.url, prompts, max_new)
        risd_tpfs = [t for t in (decode_tpf(r) for r in risd_res) if t is not None]
        REPORT["risd_tpf_mean"] = sum(risd_tpfs) / len(risd_tpfs) if risd_tpfs else None
        compare("sglang_risd_vs_sglang_ar", tiny, prompts, [output_ids(r) for r in risd_res], ar_out)
        # the adapter must act on the drafts (else the exactness above would be trivial): per-request TPF differs
        isd_tpf = [decode_tpf(r) for r in isd_res]
        changed = sum(a != b for a, b in zip(isd_tpf, (decode_tpf(r) for r in risd_res)))
        check("risd_adapter_changes_drafts", changed > 0,
              f"TPF differs from ISD's on {changed}/{len(prompts)} requests; R-ISD mean TPF "
              f"{_fmt(REPORT['risd_tpf_mean'], 3)} vs ISD {_fmt(REPORT['tiny_tpf_mean'], 3)}")
    sampled_smoke(isd)
    robustness(isd, vocab)


# ------------------------------------------------------------------------------------------------- speed
def _bench(server: SGLangServer, algo: str, levels: list[int], output_len: int, timeout: float,
           sampled: tuple | None) -> dict:
    from idlm.eval.throughput import BenchConfig, run_bench

    say(f"waiting for {server.name}")
    server.wait_ready(timeout)
    say(f"{server.name} ready after {server.ready_s:.0f} s; benchmarking C={levels}"
        + (f", sampled {sampled}" if sampled else ""))
    cfg = BenchConfig(base_url=server.url, concurrency=levels, input_len=512, output_len=output_len, api="sglang",
                      engine="sglang", algorithm=algo, stride=4 if algo == "isd" else 1, num_prompts=None,
                      timeout=300)
    if sampled:
        t, p, k = sampled
        cfg = dataclasses.replace(cfg, temperature=t, top_p=p, top_k=k)
    res = asyncio.run(run_bench(cfg))
    res["model"] = "Qwen3-8B shape, random weights (--load-format dummy)"
    for e in res["results"]:
        if e.get("errors"):
            REPORT["errors"].append(f"{server.name} C={e['concurrency']}: {e.get('error_examples')}")
    return res


def phase_speed(pairs: dict[str, tuple[SGLangServer, SGLangServer]], timeout: float, out: Path, levels: list[int],
                output_len: int) -> None:
    """pairs: attention backend -> (ISD server, AR server), the first one the run's main backend (its benches keep
    the names bench_isd.json / bench_ar.json and fill serving_h100.{json,md}). Every server is timed in turn, greedy
    and (BENCH_SAMPLED) sampled."""
    benches: dict[tuple[str, str, str], dict] = {}  # (backend, algo, "greedy" | "sampled") -> bench result
    main_backend = next(iter(pairs))
    for backend, (isd, ar) in pairs.items():
        suffix = "" if backend == main_backend else f"_{backend}"
        for s, algo in ((isd, "isd"), (ar, "ar")):
            for mode, sampled in (("greedy", None), ("sampled", SAMPLED)):
                if mode == "sampled" and not SAMPLED:
                    continue
                res = _bench(s, algo, levels, output_len, timeout, sampled)
                name = f"bench_{algo}{'_sampled' if sampled else ''}{suffix}.json"
                (out / name).write_text(json.dumps(res, indent=2))
                benches[(backend, algo, mode)] = res
    res_dir = out / "docs" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    if SAMPLED:
        _, sampled_table = serving_results(benches[(main_backend, "isd", "sampled")],
                                           benches[(main_backend, "ar", "sampled")], levels)
        REPORT["speed_sampled"] = {"sampling": SAMPLED, "table": sampled_table}
        say(f"sampled requests (temperature, top_p, top_k = {SAMPLED}):\n{sampled_table}")
    result, table = serving_results(benches[(main_backend, "isd", "greedy")], benches[(main_backend, "ar", "greedy")],
                                    levels)
    (res_dir / "serving_h100.json").write_text(json.dumps(result, indent=2) + "\n")
    (res_dir / "serving_h100.md").write_text(table)
    REPORT["speed"] = result
    say(table)
    steps = {key: {e["concurrency"]: e.get("step_ms") for e in res["results"]} for key, res in benches.items()}
    cross, cross_table = backend_ratios(steps, levels, STEP_RATIO_TARGETS)
    cross.update({"device": REPORT.get("gpu"), "sglang": SGLANG_VERSION, "sampling": SAMPLED,
                  "model": result["model"], "output_len": output_len,
                  "command": "IDLM_SGLANG_BACKENDS=A,B BENCH_SAMPLED=T,P,K PHASES=2 "
                             "bash scripts/dev/sglang_gpu_check.sh"})
    (res_dir / "serving_backends.json").write_text(json.dumps(cross, indent=2) + "\n")
    (res_dir / "serving_backends.md").write_text(cross_table)
    REPORT["speed_backends"] = cross
    say(cross_table)
    for mode, targets in STEP_RATIO_TARGETS.items():
        best = cross["best"].get(mode)
        if best is None:
            continue
        for c, target in targets.items():
            r = best["ratio"].get(str(c))
            check(f"isd_step_ratio_{mode}_C{c}", r is not None and r <= target,
                  f"ISD step ({best['isd_backend']}) / faster AR step = {_fmt(r, 2)} (target <= {target})")


def backend_ratios(steps: dict[tuple[str, str, str], dict[int, float | None]], levels: list[int],
                   targets: dict[str, dict[int, float]]) -> tuple[dict, str]:
    """ISD step / AR step across attention backends, from one run's measured step times.

    steps: (backend, "isd" | "ar", "greedy" | "sampled") -> {concurrency: step ms (None if not measured)}.
    Returns (JSON, markdown). The JSON has, per mode, ``pairs[isd_backend][ar_backend][C]`` (each ISD backend against
    each AR backend), ``faster_ar[C]`` (the AR backend with the shorter step at C and its ms) and ``best``: the ISD
    backend whose ratio to the faster AR is lowest at the largest C with a target (the one to serve by default), with
    its ``ratio[C]`` against the faster AR at every C.
    """
    out: dict = {"levels": levels, "targets": {m: {str(c): t for c, t in tg.items()} for m, tg in targets.items()},
                 "pairs": {}, "faster_ar": {}, "best": {}}
    lines: list[str] = []
    for mode in ("greedy", "sampled"):
        isd_b = sorted({b for b, a, m in steps if a == "isd" and m == mode})
        ar_b = sorted({b for b, a, m in steps if a == "ar" and m == mode})
        if not isd_b or not ar_b:
            continue
        faster: dict[str, dict] = {}
        for c in levels:
            have = [(steps[(b, "ar", mode)].get(c), b) for b in ar_b if steps[(b, "ar", mode)].get(c)]
            if have:
                ms, b = min(have)
                faster[str(c)] = {"backend": b, "step_ms": ms}
        pairs = {ib: {ab: {str(c): _ratio(steps[(ib, "isd", mode)].get(c), steps[(ab, "ar", mode)].get(c))
                           for c in levels} for ab in ar_b} for ib in isd_b}
        vs_faster = {ib: {str(c): _ratio(steps[(ib, "isd", mode)].get(c), faster.get(str(c), {}).get("step_ms"))
                          for c in levels} for ib in isd_b}
        key_c = str(max(targets.get(mode, {}) or levels))
        ranked = sorted((r if (r := vs_faster[ib].get(key_c)) is not None else float("inf"), ib) for ib in isd_b)
        best = ranked[0][1]
        out["pairs"][mode], out["faster_ar"][mode] = pairs, faster
        out["best"][mode] = {"isd_backend": best, "ratio": vs_faster[best]}
        lines += [f"**{mode}**: ISD step / AR step (N = 4), each ISD backend against each AR backend and against the "
                  f"faster AR at each C", "",
                  "| ISD backend | against | " + " | ".join(f"C = {c}" for c in levels) + " |",
                  "| --- | --- |" + " --- |" * len(levels)]
        for ib in isd_b:
            for ab in ar_b:
                lines.append(f"| {ib} | {ab} AR | " + " | ".join(_fmt(pairs[ib][ab][str(c)], 2) for c in levels)
                             + " |")
            lines.append(f"| {ib} | the faster AR | " + " | ".join(_fmt(vs_faster[ib][str(c)], 2) for c in levels)
                         + " |")
        lines.append("| | faster AR: backend, step ms | " + " | ".join(
            f"{faster[str(c)]['backend']} {faster[str(c)]['step_ms']:.2f}" if str(c) in faster else "-"
            for c in levels) + " |")
        tg = targets.get(mode, {})
        lines.append("| | target | " + " | ".join(f"<= {tg[c]}" if c in tg else "-" for c in levels) + " |")
        lines.append("")
    return out, "\n".join(lines)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def _fmt(v, d=1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def serving_results(bench_isd: dict, bench_ar: dict, levels: list[int],
                    verify_attention: str | None = None) -> tuple[dict, str]:
    """docs/results/serving_h100.json (rows with engine, algorithm, stride, concurrency, tok_s_total, tok_s_per_req,
    step_ms, ...) and its markdown table, from the two `idlm bench throughput` outputs of one run.
    verify_attention: the ISD server's IDLM_ISD_VERIFY_ATTENTION (default: this process's, else "gqa"); overlap
    scheduling of the ISD server: on unless IDLM_ISD_OVERLAP=0 (idlm.inference.sglang_isd.testing.isd_flags)."""
    verify_attention = verify_attention or os.environ.get("IDLM_ISD_VERIFY_ATTENTION", "gqa")
    overlap = os.environ.get("IDLM_ISD_OVERLAP", "1") != "0"
    rows = []
    for algo, res in (("isd", bench_isd), ("ar", bench_ar)):
        for e in res["results"]:
            rows.append({"engine": "sglang", "algorithm": algo, "stride": 4 if algo == "isd" else 1,
                         "concurrency": e["concurrency"], "tok_s_total": e.get("tok_s_total"),
                         "tok_s_per_req": e.get("tok_s_per_req"), "step_ms": e.get("step_ms"),
                         "ttft_ms": e.get("ttft_ms"), "tpf": e.get("tpf")})
    step = {(r["algorithm"], r["concurrency"]): r["step_ms"] for r in rows}
    ratios = {c: (step[("isd", c)] / step[("ar", c)] if step.get(("isd", c)) and step.get(("ar", c)) else None)
              for c in levels}
    result = {"format": "idlm-bench-throughput", "device": REPORT.get("gpu") or "not recorded (rebuilt)",
              "sglang": SGLANG_VERSION,
              "verify_attention": verify_attention, "isd_overlap_schedule": overlap,
              "model": "Qwen3-8B shape, random weights (--load-format dummy), bf16, CUDA graphs",
              "attention_backend": REPORT.get("attention_backend", "triton"),
              "dataset": "random-512in", "max_tokens": bench_isd.get("max_tokens"), "results": rows,
              "isd_step_over_ar_step": {str(c): r for c, r in ratios.items()},
              "targets": {str(c): t for c, t in STEP_RATIO_TARGETS["greedy"].items()},
              "command": "bash scripts/dev/final_gpu_run.sh (runs scripts/dev/sglang_gpu_check.sh)"}
    lines = ["| engine | algorithm | N | C | tok/s total | tok/s per request | step ms | TTFT ms | TPF |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| sglang | {r['algorithm']} | {r['stride']} | {r['concurrency']} | {_fmt(r['tok_s_total'])} | "
                     f"{_fmt(r['tok_s_per_req'])} | {_fmt(r['step_ms'], 2)} | {_fmt(r['ttft_ms'])} | "
                     f"{_fmt(r['tpf'], 2)} |")
    lines += ["", "| C | ISD step / AR step | target |", "| --- | --- | --- |"]
    for c in levels:
        lines.append(f"| {c} | {_fmt(ratios[c], 2)} | {result['targets'].get(str(c), '-')} |")
    return result, "\n".join(lines) + "\n"


def rebuild(bench_dir: Path, out_dir: Path, levels: list[int]) -> None:
    """Write serving_h100.{json,md} from bench_isd.json / bench_ar.json of an earlier run (e.g. when that run did not
    get to write them)."""
    isd = json.loads((bench_dir / "bench_isd.json").read_text())
    ar = json.loads((bench_dir / "bench_ar.json").read_text())
    result, table = serving_results(isd, ar, levels)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving_h100.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "serving_h100.md").write_text(table)
    print(table)


# ------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/sglang_gpu_check"))
    ap.add_argument("--phases", default=os.environ.get("PHASES", "1,2"), help="1 = correctness, 2 = speed")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET_S", "560")),
                    help="seconds this script may use (it skips phase 2 when too little is left)")
    ap.add_argument("--startup-timeout", type=float, default=330)
    ap.add_argument("--levels", default=os.environ.get("LEVELS", "1,8,32,64"), help="concurrencies of the speed phase")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--attention-backend", default=os.environ.get("IDLM_SGLANG_ATTENTION", "triton"),
                    choices=["triton", "flashinfer"], help="every server's --attention-backend (ISD, AR, R-ISD)")
    ap.add_argument("--backends", default=os.environ.get("IDLM_SGLANG_BACKENDS"),
                    help="speed phase only: comma-separated attention backends (triton, flashinfer), an ISD and an "
                         "AR 8B server for each, all timed in one run (default: --attention-backend alone)")
    ap.add_argument("--mem-fraction", type=float, default=float(os.environ.get("IDLM_SGLANG_MEM_FRACTION", "0.8")),
                    help="--mem-fraction-static of each server (lower it when other work shares the GPU)")
    ap.add_argument("--train-steps", type=int, default=int(os.environ.get("TRAIN_STEPS", "300")),
                    help="steps of the synthetic-language training of the tiny model "
                         "(idlm.inference.sglang_isd.testing)")
    ap.add_argument("--profile", type=int, default=int(os.environ.get("ISD_PROFILE", "0")),
                    help="log the 8B ISD server's step-time breakdown every N steps (IDLM_ISD_PROFILE; syncs the GPU)")
    ap.add_argument("--rebuild", metavar="BENCH_DIR", help="only write serving_h100.{json,md} into --out from "
                    "BENCH_DIR/bench_{isd,ar}.json of an earlier run (no GPU needed)")
    args = ap.parse_args()
    if args.rebuild:
        rebuild(Path(args.rebuild), Path(args.out), [int(c) for c in args.levels.split(",")])
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    phases = {int(p) for p in args.phases.split(",") if p.strip()}
    levels = [int(c) for c in args.levels.split(",")]
    servers: list[SGLangServer] = []
    rc = 0
    try:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        REPORT["gpu"] = torch.cuda.get_device_name(0)
        big = write_dummy_qwen3_8b(work, stride=4) if 2 in phases else None
        backend = ["--attention-backend", args.attention_backend]  # after BASE_FLAGS: the later flag wins
        REPORT["attention_backend"] = args.attention_backend
        mem = ["--mem-fraction-static", str(args.mem_fraction)]
        small = backend + mem + ["--max-total-tokens", "60000", "--max-running-requests", "64",
                                 "--cuda-graph-max-bs", "64", "--dtype", "bfloat16"]
        big_common = mem + ["--load-format", "dummy", "--max-total-tokens", "60000", "--max-running-requests", "64",
                            "--cuda-graph-max-bs", "64", "--dtype", "bfloat16", "--context-length", "4096"]
        # the run's backend first (its servers keep the names 8b-isd / 8b-ar), then any other --backends
        asked = [b.strip() for b in (args.backends or "").split(",") if b.strip()]
        speed_backends = [args.attention_backend] + [b for b in dict.fromkeys(asked) if b != args.attention_backend]
        for b in speed_backends:
            if b not in ("triton", "flashinfer"):
                raise SystemExit(f"--backends: unknown attention backend {b!r} (triton, flashinfer)")
        REPORT["speed_backends_asked"] = speed_backends
        yaml4 = ROOT / "configs/inference/idlm_blockN4.yaml"
        profile_env = {"IDLM_ISD_PROFILE": str(args.profile)} if args.profile else {}
        if 2 in phases:  # the 8B servers start first: their start-up is the longest
            for i, b in enumerate(speed_backends):
                tag, bigf = ("" if i == 0 else f"-{b}"), ["--attention-backend", b] + big_common
                servers += [SGLangServer(f"8b-isd{tag}", str(big), 30013 + 10 * i, isd_flags(4) + bigf,
                                         out / f"logs/8b_isd{tag}.log", env=profile_env),
                            SGLangServer(f"8b-ar{tag}", str(big), 30014 + 10 * i, bigf, out / f"logs/8b_ar{tag}.log")]
            for s in servers:
                say(f"starting {s.name}: log {s.log_path}")
                s.start()
        if 1 in phases:
            t = elapsed()
            tiny, vocab = build_tiny_idlm(work, stride=4, train_steps=args.train_steps)
            say(f"tiny I-DLM built and trained ({args.train_steps} steps on the synthetic language) in "
                f"{elapsed() - t:.0f} s")
            adapter = build_random_gated_lora(tiny, work / "tiny_gated_lora", stride=4)
            risd_env = {"IDLM_ISD_CONFIG": json.dumps({"stride": 4, "lora": str(adapter)})}
            tiny_servers = [SGLangServer("tiny-isd", str(tiny), 30011, paper_isd_flags(yaml4) + small,
                                         out / "logs/tiny_isd.log"),
                            SGLangServer("tiny-ar", str(tiny), 30012, small, out / "logs/tiny_ar.log"),
                            SGLangServer("tiny-risd", str(tiny), 30015, isd_flags(4) + small,
                                         out / "logs/tiny_risd.log", env=risd_env)]
            for s in tiny_servers:
                say(f"starting {s.name}: log {s.log_path}")
                s.start()
            servers += tiny_servers
        by = {s.name: s for s in servers}
        if 1 in phases:
            try:
                phase_correctness(tiny, vocab, by["tiny-isd"], by["tiny-ar"], args.startup_timeout, by["tiny-risd"])
            finally:
                for name in ("tiny-isd", "tiny-ar", "tiny-risd"):
                    by[name].stop()  # free the GPU for the timing phase
        if 2 in phases:
            left = args.budget - elapsed()
            if left < 150:
                check("speed_phase", False, f"skipped: only {left:.0f} s of the budget left (run with PHASES=2)")
            else:
                # start-up timeouts count from each server's launch; the AR sweep takes ~30 s after it is up
                pairs = {b: (by[f"8b-isd{tag}"], by[f"8b-ar{tag}"])
                         for i, b in enumerate(speed_backends) for tag in ["" if i == 0 else f"-{b}"]}
                phase_speed(pairs, elapsed() + max(60.0, left - 45), out, levels, args.output_len)
    except Exception as exc:
        REPORT["errors"].append("".join(traceback.format_exception(exc))[-4000:])
        SUMMARY.append(f"ERROR {type(exc).__name__}: {str(exc)[:2000]}")
        rc = 1
    finally:
        for s in servers:
            s.stop()
        REPORT["startup_s"] = {s.name: s.ready_s for s in servers}
        REPORT["elapsed_s"] = elapsed()
        (out / "sglang_gpu_check.json").write_text(json.dumps(REPORT, indent=2, default=str) + "\n")
    failed = [k for k, v in REPORT["checks"].items() if not v["ok"]]
    rc = rc or int(bool(failed))
    print("\n================ sglang_gpu_check summary ================")
    print(f"GPU {REPORT.get('gpu')}, {elapsed():.0f} s, start-ups {REPORT['startup_s']}")
    for line in SUMMARY:
        print(line)
    print(f"results: {out}/sglang_gpu_check.json" + (f", {out}/docs/results/serving_h100.json" if "speed" in REPORT
                                                      else ""))
    print("OVERALL:", "PASS" if rc == 0 else "FAIL")
    return rc


if __name__ == "__main__":
    sys.exit(main())
