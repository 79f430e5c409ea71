"""The real-weight serving table (docs/results/serving_h200.md): a base model and its conversion served one after
another on this machine through the shipped commands, each streamed the same GSM8K test prompts by `idlm bench
throughput` at every concurrency, greedy and at the paper's protocol (temperature 1.0, top-p 0.95, top-k 50).

    python scripts/dev/serving_table.py --base BASE --converted CONVERTED --out OUT \
        [--adapter ADAPTER] [--systems ar,ngram,isd,r-isd] [--concurrency 1,8,32,64,128] [--output-len 256]

Systems (`--engine sglang`, the default):
    ar     idlm serve --engine sglang --ar --model BASE                          (SGLang AR, one token per forward)
    ngram  the same with SGLang's NGRAM speculative decoding (needs no draft model: drafts from the prompt and the
           text so far; SGLang's defaults, 12 draft tokens)
    isd    idlm serve --engine sglang --model CONVERTED --stride N               (ISD)
    r-isd  idlm serve --engine sglang --model BASE --lora ADAPTER                (R-ISD: the base's output)
All in one dtype (--dtype, default bfloat16 under SGLang), with --max-batch-size the largest concurrency.
`--engine native` serves with the reference engine instead (ar: the converted model at --stride 1; ngram has no
native form and is refused): the CPU test's way through the same code.

The prompts are the first questions of --gsm8k, with the boxed-answer instruction `idlm eval` adds, in the base's
chat template, as token ids (OUT/prompts.jsonl); requests end at the model's end of turn or at --output-len.

Output: OUT/<system>-<protocol>.json (`idlm bench throughput`, read by `idlm tables`), OUT/serve-<system>.log,
OUT/table.md and OUT/serving_table.json: per protocol and concurrency, each system's tokens/s per request, TPF and
decode step time, its speed-up over ar, and for isd / r-isd the speed-up predicted from its TPF and step times:
TPF x (ar step / its step), against the measured one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from small_scale import free_port, idlm, run_logged, stop_group, wait_healthy  # noqa: E402

PROTOCOLS = {"greedy": ["--temperature", "0"],
             "paper": ["--temperature", "1.0", "--top-p", "0.95", "--top-k", "50"]}
NGRAM_ARGS = "--speculative-algorithm NGRAM"


def serve_args(system: str, a: argparse.Namespace) -> list[str]:
    """`idlm serve` arguments of one system (see the module docstring)."""
    sglang = a.engine == "sglang"
    # one dtype for every system: a float32 base beside a bfloat16 conversion would time two different models
    dtype = a.dtype or ("bfloat16" if sglang else "auto")
    common = ["--engine", a.engine, "--max-batch-size", str(max(a.concurrency)), "--dtype", dtype]
    extra = a.sglang_args
    if system == "ar":
        model = ["--model", a.base, "--ar"] if sglang else ["--model", a.converted, "--stride", "1"]
    elif system == "ngram":
        if not sglang:
            raise SystemExit("ngram is SGLang's: it has no --engine native form")
        model, extra = ["--model", a.base, "--ar"], f"{extra} {NGRAM_ARGS}".strip()
    elif system == "isd":
        model = ["--model", a.converted, "--stride", str(a.stride)]
    elif system == "r-isd":
        if not a.adapter:
            raise SystemExit("r-isd needs --adapter")
        model = ["--model", a.base, "--lora", a.adapter]
    else:
        raise SystemExit(f"unknown system {system!r}: ar, ngram, isd, r-isd")
    return [*model, *common, *(["--sglang-args", extra] if sglang and extra else [])]


def write_prompts(base: str, gsm8k: str, count: int, path: Path) -> int:
    """The first ``count`` GSM8K questions as chat-template token ids, one {"input_ids": [...]} per line."""
    from transformers import AutoTokenizer

    from idlm.chat import encode_prompt
    from idlm.eval.tasks import BOXED_SUFFIX

    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in Path(gsm8k).read_text().splitlines() if line.strip()][:count]
    if not rows:
        raise SystemExit(f"{gsm8k}: no questions")
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps({"input_ids": encode_prompt(tok, r["question"] + BOXED_SUFFIX)}) + "\n")
    return len(rows)


def measure(system: str, a: argparse.Namespace, out: Path, prompts: Path) -> dict[str, dict]:
    """Serve one system, bench it under each protocol, stop it; {protocol: bench JSON} (an error entry on failure)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"PYTHONPATH": a.serve_pythonpath} if a.serve_pythonpath else {}
    t0 = time.time()
    server = run_logged(idlm("serve", *serve_args(system, a), "--port", str(port)), out / f"serve-{system}.log", **env)
    got: dict[str, dict] = {}
    try:
        wait_healthy(url, server, timeout=a.startup_timeout)
        print(f"[serving_table] {system}: up in {time.time() - t0:.0f} s", flush=True)
        for protocol in a.protocols:
            path = out / f"{system}-{protocol}.json"
            cmd = idlm("bench", "throughput", "--base-url", url, "--concurrency", ",".join(map(str, a.concurrency)),
                       "--dataset", str(prompts), "--output-len", str(a.output_len), "--stop-at-eos",
                       "--api", "sglang" if a.engine == "sglang" else "openai", "--no-plot", "--output", str(path),
                       *PROTOCOLS[protocol])
            with (out / f"bench-{system}.log").open("a") as fh:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
            got[protocol] = json.loads(path.read_text()) if path.is_file() else {"error": f"bench exit {rc}"}
            print(f"[serving_table] {system} {protocol}: bench exit {rc}", flush=True)
    except SystemExit as exc:  # the server died before it was healthy: the other systems still run
        got = {p: {"error": str(exc)} for p in a.protocols}
        print(f"[serving_table] {system}: {exc}", flush=True)
    finally:
        stop_group(server)
    return got


def table(results: dict[str, dict[str, dict]], protocols: list[str]) -> tuple[str, dict]:
    """Markdown and JSON of tokens/s per request (TPF, step ms) per system and concurrency, with speed-ups over ar
    and, for ISD systems, the predicted speed-up TPF x (ar step / step)."""
    lines, data = [], {}
    systems = list(results)
    for protocol in protocols:
        by = {s: {e["concurrency"]: e for e in results[s].get(protocol, {}).get("results", [])} for s in systems}
        levels = sorted({c for s in systems for c in by[s]})
        lines += [f"### {protocol}", "", "| C | " + " | ".join(systems) + " |",
                  "| --- | " + " | ".join("---" for _ in systems) + " |"]
        data[protocol] = {}
        for c in levels:
            ar = by.get("ar", {}).get(c)
            cells, row = [], {}
            for s in systems:
                e = by[s].get(c)
                if not e or "tok_s_per_req" not in e:
                    cells.append("-")
                    continue
                rec = {k: e.get(k) for k in ("tok_s_per_req", "tok_s_total", "tpf", "step_ms", "errors")}
                cell = f"{e['tok_s_per_req']:.1f}"
                if e.get("tpf") is not None and e.get("step_ms") is not None:
                    cell += f" (TPF {e['tpf']:.2f}, {e['step_ms']:.2f} ms)"
                if ar and s != "ar" and ar.get("tok_s_per_req"):
                    rec["speedup"] = e["tok_s_per_req"] / ar["tok_s_per_req"]
                    cell += f" **{rec['speedup']:.2f}x**"
                    if s in ("isd", "r-isd") and e.get("tpf") and e.get("step_ms") and ar.get("step_ms"):
                        rec["predicted"] = e["tpf"] * ar["step_ms"] / e["step_ms"]
                        cell += f" (pred. {rec['predicted']:.2f}x)"
                cells.append(cell)
                row[s] = rec
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
            data[protocol][c] = row
        lines.append("")
    lines.append("Tokens/s per request (end to end, TTFT included); TPF and decode step time as `idlm bench "
                 "throughput` measures them; speed-up over ar at the same C; pred.: TPF x (ar step / step).")
    return "\n".join(lines) + "\n", data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base model directory (AR, NGRAM, R-ISD's base)")
    ap.add_argument("--converted", required=True, help="the converted I-DLM checkpoint (ISD)")
    ap.add_argument("--adapter", default=None, help="a gated-LoRA adapter directory (R-ISD)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--engine", default="sglang", choices=["sglang", "native"])
    ap.add_argument("--systems", default=None, help="comma-separated (default: ar,ngram,isd and r-isd with "
                    "--adapter; ar,isd on --engine native)")
    ap.add_argument("--protocols", default="greedy,paper")
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--gsm8k", default=str(ROOT / "data/gsm8k/test.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=256, help="GSM8K questions to draw from (default 256)")
    ap.add_argument("--sglang-args", default="--mem-fraction-static 0.3 --cuda-graph-max-bs 128")
    ap.add_argument("--serve-pythonpath", default=None, help="PYTHONPATH of the servers (an SGLang install)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                    help="every server's dtype (default: bfloat16 on sglang, auto on native)")
    a = ap.parse_args()
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.protocols = [p for p in a.protocols.split(",") if p]
    bad = [p for p in a.protocols if p not in PROTOCOLS]
    if bad:
        raise SystemExit(f"unknown protocol(s) {bad}: {', '.join(PROTOCOLS)}")
    default = ["ar", "ngram", "isd"] + (["r-isd"] if a.adapter else []) if a.engine == "sglang" else ["ar", "isd"]
    systems = a.systems.split(",") if a.systems else default
    for s in systems:
        serve_args(s, a)  # refuse a bad system before anything starts
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    n = write_prompts(a.base, a.gsm8k, a.num_prompts, prompts)
    print(f"[serving_table] {n} GSM8K prompts -> {prompts}", flush=True)
    t0 = time.time()
    results = {s: measure(s, a, out, prompts) for s in systems}
    text, data = table(results, a.protocols)
    (out / "table.md").write_text(text)
    summary = {"systems": systems, "engine": a.engine, "concurrency": a.concurrency, "output_len": a.output_len,
               "protocols": {p: PROTOCOLS[p] for p in a.protocols}, "seconds": round(time.time() - t0, 1),
               "table": data, "runs": {s: {p: str(out / f"{s}-{p}.json") for p in a.protocols} for s in systems}}
    (out / "serving_table.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text, flush=True)
    failed = [f"{s} {p}" for s, r in results.items() for p, j in r.items() if "error" in j]
    if failed:
        print(f"[serving_table] failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
