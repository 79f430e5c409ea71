"""The small-scale sweep (docs/results/small_scale.md): the shipped commands, driven in order on one machine.

    python scripts/small_scale.py --sweep configs/train/smollm2_sweep.yaml --out outputs/smollm2 [--set key=value]

1. `idlm train RECIPE --phases prepare,generate`: the base, its conversion and the generated data (shared work_dir);
2. `idlm train RECIPE output_dir=OUT/<run> <overrides>` for every run of the sweep, all at once (one GPU holds them);
3. the run to serve is chosen by the sweep's quality targets; `idlm serve` (native engine) serves it at the sweep's
   stride, and the base with the adapter run's gated LoRA (R-ISD); `idlm eval` scores both (--no-thinking) under
   each of the sweep's serve.protocols: greedy (the default) and/or paper (temperature 1.0, top-p 0.95, top-k 50);
4. OUT/sweep.json gathers every run's eval.json and the scores; OUT/frontier.png plots quality loss against TPF
   (`--plot OUT/sweep.json [MORE.json ...]` draws it again, several sweeps in one plot, e.g. on a machine with
   matplotlib when the GPU image has none).

``--set`` overrides are added to every `idlm train` call (e.g. base.gguf=PATH). Each step skips what is done.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[small_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def idlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "idlm.cli", *args]


def run_logged(cmd: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    fh = log_path.open("a")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, int]:
    codes = {}
    for name, p in procs.items():
        codes[name] = p.wait()
        log(f"{name}: exit {codes[name]}")
    return codes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"server at {url} not healthy after {timeout:.0f} s")


def gsm8k_tpf(r: dict) -> float:
    """Greedy GSM8K TPF of a run's eval.json at the largest stride it measured."""
    isd = r["converted"]["isd"]
    n = max(int(k.rsplit("_n", 1)[1]) for k in isd if k.startswith("gsm8k_greedy_n"))
    return isd[f"gsm8k_greedy_n{n}"]["tpf"]


def converted_runs(results: dict[str, dict]) -> dict[str, dict]:
    """The runs that trained a conversion (an adapter-only run has no converted model to choose or plot)."""
    return {n: r for n, r in results.items() if "converted" in r}


def choose(results: dict[str, dict], targets: dict) -> str | None:
    """The run to serve: highest greedy GSM8K TPF at the largest stride among the runs within both quality targets,
    else the run with the lowest KL; None when no run trained a conversion."""
    results = converted_runs(results)
    if not results:
        return None
    ok = [n for n, r in results.items() if r["converted"]["quality"]["kl_per_token"] <= targets["kl_per_token"]
          and r["converted"]["quality"]["nll_ratio"] <= targets["nll_ratio"]]
    if ok:
        return max(ok, key=lambda n: gsm8k_tpf(results[n]))
    return min(results, key=lambda n: results[n]["converted"]["quality"]["kl_per_token"])


# `idlm eval` sampling flags by protocol name (sweep.serve.protocols; default: greedy only)
PROTOCOLS = {"greedy": ["--temperature", "0"],
             "paper": ["--temperature", "1.0", "--top-p", "0.95", "--top-k", "50"]}  # the paper's evaluation


def serve_and_eval(name: str, serve_args: list[str], benchmarks: dict, out: Path,
                   protocols: tuple[str, ...] = ("greedy",)) -> dict:
    """Serve one model with `idlm serve` and score it with `idlm eval` on ``benchmarks`` under each protocol;
    returns {bench: {...}} for greedy alone (the first sweep's layout), else {protocol: {bench: {...}}}."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise SystemExit(f"unknown serve protocol(s) {unknown}: choose from {sorted(PROTOCOLS)}")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = run_logged(idlm("serve", *serve_args, "--port", str(port), "--max-batch-size", "64"),
                        out / f"serve-{name}.log")
    scores: dict = {}
    try:
        wait_healthy(base_url, server)
        for protocol in protocols:
            tag = name if protocol == "greedy" else f"{name}-{protocol}"
            scores[protocol] = {}
            for bench, limit in benchmarks.items():
                t0 = time.time()
                cmd = idlm("eval", "--base-url", f"{base_url}/v1", "--suite", bench, "--output",
                           str(out / f"eval-{tag}"), *PROTOCOLS[protocol], "--no-thinking", "--max-tokens", "512",
                           "--concurrency", "64", "--no-progress", *(["--limit", str(limit)] if limit else []))
                rc = subprocess.run(cmd, cwd=ROOT, stdout=(out / f"eval-{tag}.log").open("a"),
                                    stderr=subprocess.STDOUT).returncode
                summary = out / f"eval-{tag}" / "summary.json"
                got = json.loads(summary.read_text())["benchmarks"].get(bench) if summary.is_file() else None
                scores[protocol][bench] = {"exit": rc, "seconds": round(time.time() - t0, 1), "summary": got}
                log(f"{tag} {bench}: exit {rc}, {json.dumps(got)[:300] if got else 'no summary'}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return scores["greedy"] if tuple(protocols) == ("greedy",) else scores


def frontier_plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in converted_runs(results).items():
        q = r["converted"]["quality"]
        y = gsm8k_tpf(r)
        for ax, x in ((axes[0], q["kl_per_token"]), (axes[1], 100 * (q["nll_ratio"] - 1))):
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[0].axvline(0.05, ls="--", c="grey")
    axes[1].axvline(2.0, ls="--", c="grey")
    axes[0].set(xlabel="KL(base || converted), nats/token", ylabel="TPF, greedy GSM8K test, N = 4",
                title="quality kept vs tokens per forward")
    axes[1].set(xlabel="held-out NLL increase over the base (%)", ylabel="TPF, greedy GSM8K test, N = 4",
                title="gold GSM8K solutions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(ROOT / "configs/train/smollm2_sweep.yaml"))
    ap.add_argument("--out", default=str(ROOT / "outputs/smollm2"))
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--plot", metavar="SWEEP_JSON", nargs="+", help="only draw the frontier plot of finished "
                    "sweep.json files, their runs together (beside the first, as frontier.png)")
    args = ap.parse_args()
    if args.plot:
        path = Path(args.plot[0])
        runs: dict[str, dict] = {}
        for f in args.plot:
            for name, r in json.loads(Path(f).read_text())["runs"].items():
                runs[name if name not in runs else f"{name} ({Path(f).stem})"] = r
        frontier_plot(runs, path.with_name("frontier.png"))
        log(f"wrote {path.with_name('frontier.png')}")
        return 0
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    recipe = str((ROOT / sweep["recipe"]).resolve())
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"work_dir={out / 'work'}", *args.common]
    runs = {k: v for k, v in sweep["runs"].items() if not args.only or k in args.only.split(",")}

    t0 = time.time()
    log("prepare + generate")
    rc = subprocess.run(idlm("train", recipe, *common, "--phases", "prepare,generate"), cwd=ROOT,
                        stdout=(out / "prepare.log").open("a"), stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"prepare/generate failed (exit {rc}): see {out / 'prepare.log'}")
    log(f"prepare + generate done in {time.time() - t0:.0f} s; starting {len(runs)} runs")
    # each run its own datasets cache: runs that tokenise the same file at once must not share cache files
    procs = {name: run_logged(idlm("train", recipe, *common, f"output_dir={out / name}", *overrides),
                              out / f"{name}.log", HF_DATASETS_CACHE=str(out / name / "hf_datasets"))
             for name, overrides in runs.items()}
    codes = wait_all(procs)
    results = {}
    for name in runs:
        p = out / name / "eval.json"
        if p.is_file():
            results[name] = json.loads(p.read_text())
    summary: dict = {"exit_codes": codes, "runs": results, "seconds_train": round(time.time() - t0, 1)}
    if converted_runs(results):
        try:
            frontier_plot(results, out / "frontier.png")
        except ImportError as e:  # a GPU image without matplotlib: `--plot OUT/sweep.json` draws it elsewhere
            log(f"no frontier plot here ({e}); draw it with --plot {out / 'sweep.json'}")
        summary["chosen"] = choose(results, sweep["targets"])
        log(f"chosen: {summary['chosen']}")
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.skip_serve and results:
        s = sweep["serve"]
        chosen = summary.get("chosen")
        protocols = tuple(s.get("protocols", ["greedy"]))
        summary["served"] = {}
        if chosen:
            final = sorted((out / chosen).glob("stage*-n*"))[-1]
            summary["served"][chosen] = serve_and_eval(chosen, ["--model", str(final), "--stride", str(s["stride"])],
                                                       s["benchmarks"], out, protocols)
        adapter = sorted((out / s["adapter_run"]).glob("adapter*")) if s.get("adapter_run") else []
        if adapter:
            summary["served"]["base+adapter"] = serve_and_eval(
                "base", ["--model", str(out / "work" / "base"), "--lora", str(adapter[-1])], s["benchmarks"], out,
                protocols)
        summary["seconds_total"] = round(time.time() - t0, 1)
        (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f} s: {out / 'sweep.json'}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
