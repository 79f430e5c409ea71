"""The small-scale sweep (docs/results/small_scale.md): the shipped commands, driven in order on one machine.

    python scripts/small_scale.py --sweep configs/train/smollm2_sweep.yaml --out outputs/smollm2 [--set key=value]

1. `idlm train RECIPE --phases prepare,generate`: the base, its conversion and the generated data (shared work_dir);
2. `idlm train RECIPE output_dir=OUT/<run> <overrides>` for every run of the sweep, all at once (one GPU holds them);
3. serving (the sweep's `serve` section): `idlm serve` serves a converted run at the sweep's stride, the base with the
   adapter run's gated LoRA (R-ISD) and, with `base: true`, the base itself (AR); `idlm eval` scores each
   (--no-thinking) under each of serve.protocols: greedy (the default) and/or paper (temperature 1.0, top-p 0.95,
   top-k 50). `when: chosen` (default): after every run, the run chosen by the quality targets and the base with
   the adapter, one after the other. `when: each`: every converted run as soon as it has trained, beside its
   evaluation hooks (`idlm train --phases train`, then `--phases evaluate`), the base with the adapter as soon as
   the adapter run has trained, and the base as soon as it exists: all at once, on one GPU;
   `engine: sglang` serves through `idlm serve --engine sglang` (`--ar` for the base);
4. OUT/sweep.json gathers every run's eval.json and the scores; OUT/frontier.png plots quality loss against TPF
   (`--plot OUT/sweep.json [MORE.json ...]` draws it again, several sweeps in one plot, e.g. on a machine with
   matplotlib when the GPU image has none).

The sweep file's own `set:` (a list of KEY=VALUE, e.g. the data's sampling settings) and then ``--set`` overrides
are added to every `idlm train` call (e.g. base.gguf=PATH); the command line wins. Each step skips what is done.
``--serve-pythonpath`` gives the `idlm serve` processes their own PYTHONPATH (an SGLang install whose pins differ
from the training stack's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[small_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def idlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "idlm.cli", *args]


def run_logged(cmd: list[str], log_path: Path, **env: str) -> subprocess.Popen:
    """``cmd`` in its own process group (a server's children, e.g. SGLang's scheduler, are stopped with it)."""
    fh = log_path.open("a")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to ``proc``'s process group (`run_logged`), SIGKILL after ``timeout`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=timeout)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


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


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
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
ENGINES = ("native", "sglang")
WHEN = ("chosen", "each")


@dataclass
class ServeSettings:
    """The sweep's ``serve`` section. benchmarks: {name: item limit, or null for all items}; concurrency: requests
    in flight (the server's batch and `idlm eval --concurrency`); max_tokens: `idlm eval --max-tokens`; sglang_args:
    extra SGLang flags (`idlm serve --sglang-args`); serve_args: extra `idlm serve` flags of the served runs (e.g.
    "--draft-mode sample"; not of the base, which serves as plain AR); eval_args: extra `idlm eval` flags; base:
    also serve the base itself (AR, SGLang only)."""

    stride: int
    benchmarks: dict
    protocols: tuple[str, ...] = ("greedy",)
    engine: str = "native"
    when: str = "chosen"
    adapter_run: str | None = None
    base: bool = False
    concurrency: int = 64
    max_tokens: int = 512
    sglang_args: str = ""
    serve_args: str = ""  # extra flags of every `idlm serve` but the base's, e.g. "--draft-mode sample"
    eval_args: str = ""  # extra flags of every `idlm eval`, e.g. "--data-dir DIR"
    pythonpath: str | None = field(default=None, repr=False)  # from --serve-pythonpath, not the sweep file

    def __post_init__(self) -> None:
        self.protocols = tuple(self.protocols)
        for key, value, allowed in (("protocols", self.protocols, PROTOCOLS), ("engine", (self.engine,), ENGINES),
                                    ("when", (self.when,), WHEN)):
            bad = sorted(set(value) - set(allowed))
            if bad:
                raise SystemExit(f"sweep serve.{key}: unknown {bad}, choose from {sorted(allowed)}")
        if self.base and self.engine != "sglang":
            raise SystemExit("sweep serve.base: the base is served as plain AR by `idlm serve --engine sglang --ar`; "
                             "set serve.engine: sglang")

    @classmethod
    def from_sweep(cls, section: dict, pythonpath: str | None) -> ServeSettings:
        known = set(cls.__dataclass_fields__) - {"pythonpath"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise SystemExit(f"sweep serve: unknown key(s) {unknown}, known: {sorted(known)}")
        return cls(**section, pythonpath=pythonpath)

    def serve_command(self, model_args: list[str], port: int) -> list[str]:
        engine = ["--engine", "sglang", "--sglang-args", self.sglang_args] if self.engine == "sglang" else []
        extra = [] if "--ar" in model_args else shlex.split(self.serve_args)  # plain AR has no drafts to set
        return idlm("serve", *model_args, *engine, "--port", str(port), "--max-batch-size", str(self.concurrency),
                    *extra)

    def eval_command(self, base_url: str, bench: str, limit: int | None, protocol: str, output: Path) -> list[str]:
        # SGLang reports its speculative counts (tokens per forward) only when asked, per request
        extra = ["--extra-body", json.dumps({"return_meta_info": True})] if self.engine == "sglang" else []
        return idlm("eval", "--base-url", f"{base_url}/v1", "--suite", bench, "--output", str(output),
                    *PROTOCOLS[protocol], "--no-thinking", "--max-tokens", str(self.max_tokens), "--concurrency",
                    str(self.concurrency), "--no-progress", *(["--limit", str(limit)] if limit else []), *extra,
                    *shlex.split(self.eval_args))


def server_facts(base_url: str) -> dict:
    """What an SGLang server says of itself after the run: its attention backend and, for a speculative one, SGLang's
    own mean tokens per decode forward over everything it served (empty for the native server)."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url + "/get_server_info", timeout=30) as r:
            info = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    states = info.get("internal_states") or [{}]
    return {"attention_backend": info.get("attention_backend"), "version": info.get("version"),
            "avg_spec_accept_length": states[0].get("avg_spec_accept_length")}


def serve_and_eval(name: str, model_args: list[str], st: ServeSettings, out: Path) -> dict:
    """Serve one model with `idlm serve` and score it with `idlm eval` on ``st.benchmarks`` under each protocol.

    Returns {bench: {...}} for greedy alone on the native engine (the first sweep's layout), else
    {"startup_s", "server", "protocols": {protocol: {bench: {...}}}}."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {"PYTHONPATH": st.pythonpath} if st.pythonpath else {}
    t0 = time.time()
    server = run_logged(st.serve_command(model_args, port), out / f"serve-{name}.log", **env)
    scores: dict = {}
    try:
        wait_healthy(base_url, server)
        startup = round(time.time() - t0, 1)
        log(f"{name}: server up in {startup:.0f} s")
        for protocol in st.protocols:
            tag = name if protocol == "greedy" else f"{name}-{protocol}"
            scores[protocol] = {}
            for bench, limit in st.benchmarks.items():
                t1 = time.time()
                cmd = st.eval_command(base_url, bench, limit, protocol, out / f"eval-{tag}")
                rc = subprocess.run(cmd, cwd=ROOT, stdout=(out / f"eval-{tag}.log").open("a"),
                                    stderr=subprocess.STDOUT).returncode
                summary = out / f"eval-{tag}" / "summary.json"
                got = json.loads(summary.read_text())["benchmarks"].get(bench) if summary.is_file() else None
                scores[protocol][bench] = {"exit": rc, "seconds": round(time.time() - t1, 1), "summary": got}
                log(f"{tag} {bench}: exit {rc}, {json.dumps(got)[:300] if got else 'no summary'}")
        facts = server_facts(base_url) if st.engine == "sglang" else {}
    finally:
        stop_group(server)
    if st.protocols == ("greedy",) and st.engine == "native":
        return scores["greedy"]
    return {"startup_s": startup, "server": facts, "protocols": scores}


def final_checkpoint(run_dir: Path) -> Path | None:
    """The last curriculum stage's checkpoint of a run (None for an adapter-only run)."""
    stages = sorted(run_dir.glob("stage*-n*"))
    return stages[-1] if stages else None


def adapter_dir(run_dir: Path) -> Path | None:
    adapters = sorted(run_dir.glob("adapter*"))
    return adapters[-1] if adapters else None


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


def pipelined(recipe: str, common: list[str], runs: dict, st: ServeSettings | None, out: Path
              ) -> tuple[dict[str, int], dict[str, Future]]:
    """serve.when = each: every run's `idlm train --phases train`, all at once; as each ends, its `--phases
    evaluate` and its serving start beside the others (and the base's serving right away). Returns the exit codes
    (a run's worst of train and evaluate) and the serving futures by name."""
    pool = ThreadPoolExecutor(max_workers=len(runs) + 2)
    served: dict[str, Future] = {}
    base = out / "work" / "base"
    if st and st.base:
        served["base"] = pool.submit(serve_and_eval, "base", ["--ar", "--model", str(base)], st, out)

    def start(name: str, phase: str) -> subprocess.Popen:
        return run_logged(idlm("train", recipe, *common, f"output_dir={out / name}", *runs[name], "--phases", phase),
                          out / f"{name}.log", HF_DATASETS_CACHE=str(out / name / "hf_datasets"))

    training = {name: start(name, "train") for name in runs}
    evaluating: dict[str, subprocess.Popen] = {}
    codes: dict[str, int] = {}
    while training or evaluating:
        time.sleep(5)
        for name, proc in list(training.items()):
            if proc.poll() is None:
                continue
            del training[name]
            codes[name] = proc.returncode
            log(f"{name}: training exit {proc.returncode}")
            if proc.returncode != 0:
                continue
            evaluating[name] = start(name, "evaluate")
            final = final_checkpoint(out / name)
            if st and final is not None:
                served[name] = pool.submit(serve_and_eval, name, ["--model", str(final), "--stride", str(st.stride)],
                                           st, out)
            adapter = adapter_dir(out / name)
            if st and name == st.adapter_run and adapter is not None:
                served["base+adapter"] = pool.submit(serve_and_eval, "base+adapter",
                                                     ["--model", str(base), "--lora", str(adapter)], st, out)
        for name, proc in list(evaluating.items()):
            if proc.poll() is not None:
                del evaluating[name]
                codes[name] = codes[name] or proc.returncode
                log(f"{name}: evaluation exit {proc.returncode}")
    pool.shutdown(wait=False)
    return codes, served


def collect_served(served: dict[str, Future]) -> dict:
    got = {}
    for name, fut in served.items():
        try:
            got[name] = fut.result()
        except (Exception, SystemExit) as exc:  # one model's serving failing must not lose the others' scores
            log(f"serving {name} failed: {exc}")
            got[name] = {"error": str(exc)}
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(ROOT / "configs/train/smollm2_sweep.yaml"))
    ap.add_argument("--out", default=str(ROOT / "outputs/smollm2"))
    ap.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--serve-pythonpath", default=None, metavar="PATH",
                    help="PYTHONPATH of the `idlm serve` processes (default: inherited)")
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
    # the sweep's own overrides of the recipe (e.g. the data's sampling settings), for every phase of every run;
    # the command line's --set comes after them and wins
    sweep_set = sweep.get("set") or []
    if not isinstance(sweep_set, list) or not all(isinstance(x, str) and "=" in x for x in sweep_set):
        raise SystemExit(f"{args.sweep}: `set` must be a list of KEY=VALUE strings, got {sweep_set!r}")
    common = [f"work_dir={out / 'work'}", *sweep_set, *args.common]
    runs = {k: v for k, v in sweep["runs"].items() if not args.only or k in args.only.split(",")}
    st = None if args.skip_serve or "serve" not in sweep else \
        ServeSettings.from_sweep(sweep["serve"], args.serve_pythonpath)

    t0 = time.time()
    log("prepare + generate")
    rc = subprocess.run(idlm("train", recipe, *common, "--phases", "prepare,generate"), cwd=ROOT,
                        stdout=(out / "prepare.log").open("a"), stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"prepare/generate failed (exit {rc}): see {out / 'prepare.log'}")
    log(f"prepare + generate done in {time.time() - t0:.0f} s; starting {len(runs)} runs")
    served: dict[str, Future] = {}
    if st and st.when == "each":
        codes, served = pipelined(recipe, common, runs, st, out)
    else:
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
    if st and st.when == "each":
        summary["served"] = collect_served(served)
    elif st and results:
        chosen = summary.get("chosen")
        summary["served"] = {}
        if chosen:
            summary["served"][chosen] = serve_and_eval(
                chosen, ["--model", str(final_checkpoint(out / chosen)), "--stride", str(st.stride)], st, out)
        adapter = adapter_dir(out / st.adapter_run) if st.adapter_run else None
        if adapter:
            summary["served"]["base+adapter"] = serve_and_eval(
                "base", ["--model", str(out / "work" / "base"), "--lora", str(adapter)], st, out)
    if "served" in summary:
        summary["seconds_total"] = round(time.time() - t0, 1)
        (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {time.time() - t0:.0f} s: {out / 'sweep.json'}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
