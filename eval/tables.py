"""`idlm tables`: the paper's quality table and the throughput table/plots from result directories.

Inputs (any mix, each a directory or a file):

- an `idlm eval` output directory (its ``summary.json``, or the per-benchmark ``*/summary.json`` files);
- throughput results from `idlm bench throughput`: JSON files whose entries carry, per concurrency level,
  ``engine, algorithm, stride, concurrency, tok_s_total, tok_s_per_req, step_ms, ttft_ms, tpf``. Accepted shapes:
  ``{"results": [entry, ...], ...}`` (top-level keys such as ``engine``/``algorithm``/``stride``/``model``/
  ``dataset`` fill entries that lack them), a bare list of entries, or one entry. Missing fields show as "-".

Outputs in ``--output`` (default ``tables/``): ``quality.md``, ``throughput.md``, ``throughput_per_request.png``,
``throughput_total.png`` (plots need matplotlib), and ``tables.json`` with everything the tables show.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from idlm.errors import UserError

from .paper import QUALITY, TABLE_MODELS, THROUGHPUT_PER_REQ
from .tasks import BENCHMARKS, SUITES

log = logging.getLogger(__name__)

THROUGHPUT_FIELDS = ("engine", "algorithm", "stride", "concurrency", "tok_s_total", "tok_s_per_req", "step_ms",
                     "ttft_ms", "tpf")
_INHERITED = ("engine", "algorithm", "stride", "model", "dataset", "label", "device", "max_tokens")


# ---------------------------------------------------------------------------------------------- loading
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def _is_eval_summary(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("benchmarks"), dict)


def _is_bench_summary(obj: Any) -> bool:
    return isinstance(obj, dict) and "benchmark" in obj and "score" in obj


def throughput_entries(obj: Any, source: str = "") -> list[dict]:
    """Entries of one throughput JSON (see the module docstring); [] when it is not one."""
    top: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("results"), list):
        top, entries = obj, obj["results"]
    elif isinstance(obj, dict) and isinstance(obj.get("entries"), list):
        top, entries = obj, obj["entries"]
    elif isinstance(obj, list):
        entries = obj
    elif isinstance(obj, dict) and "concurrency" in obj:
        entries = [obj]
    else:
        return []
    out = []
    for e in entries:
        if not isinstance(e, dict) or "concurrency" not in e:
            continue
        row = {k: top.get(k) for k in _INHERITED if top.get(k) is not None}
        row.update({k: v for k, v in e.items() if v is not None})
        row["source"] = source
        out.append(row)
    return out


def load_results(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """(eval runs, throughput entries) found under ``paths``. An eval run: {label, model, benchmarks}."""
    runs: list[dict] = []
    tput: list[dict] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"{p} does not exist")
        files = [p] if p.is_file() else sorted(p.rglob("*.json"))
        files = [f for f in files if f.name not in ("run.json", "tables.json", "FETCHED.json")]
        parsed = {f: _json(f) for f in files}
        top = p / "summary.json" if p.is_dir() else None
        if top is not None and _is_eval_summary(parsed.get(top)):
            obj = parsed[top]
            runs.append({"label": obj.get("model") or p.name, "dir": str(p), "model": obj.get("model"),
                         "benchmarks": obj["benchmarks"]})
            rest = [f for f in files if not (_is_eval_summary(parsed[f]) or _is_bench_summary(parsed[f]))]
        else:
            benches = {}
            for f in files:
                obj = parsed[f]
                if _is_eval_summary(obj):
                    runs.append({"label": obj.get("model") or f.parent.name, "dir": str(f.parent),
                                 "model": obj.get("model"), "benchmarks": obj["benchmarks"]})
                elif _is_bench_summary(obj):
                    benches[obj["benchmark"]] = obj
            if benches:
                model = next((b.get("model") for b in benches.values() if b.get("model")), None)
                runs.append({"label": model or p.name, "dir": str(p), "model": model, "benchmarks": benches})
            rest = [f for f in files if not (_is_eval_summary(parsed[f]) or _is_bench_summary(parsed[f]))]
        for f in rest:
            tput += throughput_entries(parsed[f], str(f))
    labels: dict[str, int] = {}
    for r in runs:  # make labels unique
        n = labels.get(r["label"], 0)
        labels[r["label"]] = n + 1
        if n:
            r["label"] = f"{r['label']} ({n + 1})"
    return runs, tput


# ---------------------------------------------------------------------------------------------- formatting
def _fmt(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def score_difference(ref: dict, other: dict, z: float = 1.96) -> tuple[float, float, float] | None:
    """(other - ref, low, high): the difference of two benchmark summaries' scores and its 95% interval, in points;
    None without the counts.

    Scores are percentages of items (of samples averaged per item, for avg@k). The interval is Agresti and Caffo's
    (one success and one failure added to each side, then the normal approximation), which keeps its coverage at
    scores near 0 or 100 where the plain one collapses to a point. n is the item count: an avg@k item's mean lies in
    [0, 1] with variance at most p (1 - p), so for avg@k the interval is conservative."""
    try:
        p1, p2 = float(ref["score"]) / 100, float(other["score"]) / 100
        n1, n2 = int(ref["n_items"]), int(other["n_items"])
    except (KeyError, TypeError, ValueError):
        return None
    if n1 <= 0 or n2 <= 0 or not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        return None
    a1, a2 = (p1 * n1 + 1) / (n1 + 2), (p2 * n2 + 1) / (n2 + 2)
    half = z * math.sqrt(a1 * (1 - a1) / (n1 + 2) + a2 * (1 - a2) / (n2 + 2))
    return 100 * (p2 - p1), 100 * (a2 - a1 - half), 100 * (a2 - a1 + half)


def quality_table(runs: list[dict], paper_models: tuple[str, ...] = TABLE_MODELS, diff: bool = False
                  ) -> tuple[str, list[dict]]:
    """Markdown: one row per benchmark (the paper's order, then others), one column per run, then the paper's.

    diff: after the runs, a column per later run with its difference from the first run and the 95% interval of
    that difference (`score_difference`): an interval that holds 0 is no evidence of a change."""
    order = list(SUITES["paper15"])
    extra = sorted({b for r in runs for b in r["benchmarks"] if b not in order})
    rows, data = [], []
    notes = set()
    for name in order + extra:
        if not any(name in r["benchmarks"] for r in runs) and runs:
            continue
        cls = BENCHMARKS.get(name)
        display = cls.display if cls else name
        cells = [display]
        rec = {"benchmark": name, "display": display, "runs": {}, "paper": {}}
        for r in runs:
            s = r["benchmarks"].get(name)
            if s is None:
                cells.append("-")
                continue
            if s.get("skipped"):
                cells.append("skipped (no data)")
                notes.add("skipped: the benchmark's data could not be loaded (summary.json: why, where to get it)")
                continue
            txt = _fmt(s.get("score"))
            flags = []
            if s.get("limit"):
                flags.append(f"n={s.get('n_items')}")
                notes.add("n=K: a --limit run over the first K items, not comparable to the full-set numbers")
            if s.get("n_errors"):
                flags.append(f"{s['n_errors']} err")
                notes.add("err: requests that failed after retries; scored as wrong")
            if s.get("n_missing"):
                flags.append(f"{s['n_missing']} missing")
                notes.add("missing: samples not finished (an interrupted run; rerun the same command to resume)")
            if s.get("n_truncated"):
                flags.append(f"{s['n_truncated']} trunc")
                notes.add("trunc: answers cut off at max_tokens (finish_reason=length), scored as they are; "
                          "a larger --max-tokens may change the score")
            if s.get("samples_per_item", 1) > 1:
                flags.append(f"avg@{s['samples_per_item']}")
            cells.append(txt + (f" ({', '.join(flags)})" if flags else ""))
            rec["runs"][r["label"]] = s.get("score")
        if diff:
            ref = runs[0]["benchmarks"].get(name) if runs else None
            rec["diff"] = {}
            for r in runs[1:]:
                s = r["benchmarks"].get(name)
                d = score_difference(ref, s) if ref and s and not (ref.get("skipped") or s.get("skipped")) else None
                cells.append("-" if d is None else f"{d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}]")
                rec["diff"][r["label"]] = None if d is None else {"difference": d[0], "ci95": [d[1], d[2]]}
        for m in paper_models:
            v = QUALITY.get(name, {}).get(m)
            cells.append(_fmt(v))
            rec["paper"][m] = v
        rows.append(cells)
        data.append(rec)
    # the average over benchmarks every column has
    avg_cells = ["Average (rows with all columns)"]
    complete = [d for d in data if all(d["runs"].get(r["label"]) is not None for r in runs)
                and all(d["paper"].get(m) is not None for m in paper_models)]
    for r in runs:
        vals = [d["runs"][r["label"]] for d in complete]
        avg_cells.append(_fmt(sum(vals) / len(vals)) if vals else "-")
    if diff:
        avg_cells += ["-"] * (len(runs) - 1)
    for m in paper_models:
        vals = [d["paper"][m] for d in complete]
        avg_cells.append(_fmt(sum(vals) / len(vals)) if vals else "-")
    if complete:
        rows.append(avg_cells)
    deltas = [f"{r['label']} - {runs[0]['label']} (95%)" for r in runs[1:]] if diff else []
    header = ["Benchmark"] + [r["label"] for r in runs] + deltas + [f"{m} (paper)" for m in paper_models]
    text = _md_table(header, rows)
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in sorted(notes))
    return text, data


def _series_label(e: dict) -> str:
    if e.get("label"):
        return str(e["label"])
    parts = [str(e.get("engine") or "?"), str(e.get("algorithm") or "?")]
    if e.get("stride") not in (None, ""):
        parts.append(f"N={e['stride']}")
    if e.get("dataset"):
        parts.append(str(e["dataset"]))
    return " ".join(parts)


def throughput_table(entries: list[dict]) -> tuple[str, list[dict]]:
    rows = []
    ordered = sorted(entries, key=lambda e: (_series_label(e), float(e.get("concurrency") or 0)))
    for e in ordered:
        rows.append([_series_label(e), _fmt(e.get("engine")), _fmt(e.get("algorithm")), _fmt(e.get("stride")),
                     _fmt(e.get("concurrency")), _fmt(e.get("tok_s_total")), _fmt(e.get("tok_s_per_req")),
                     _fmt(e.get("step_ms"), 2), _fmt(e.get("ttft_ms")), _fmt(e.get("tpf"), 2)])
    header = ["Series", "Engine", "Algorithm", "N", "C", "tok/s total", "tok/s per request", "step ms", "TTFT ms",
              "TPF"]
    text = _md_table(header, rows) if rows else "(no throughput results)"
    paper_rows = [[name, *[f"{lo:g}-{hi:g}" if lo != hi else f"{lo:g}" for lo, hi in
                           (v.get(c, (None, None)) for c in (32, 64)) if lo is not None]]
                  for name, v in THROUGHPUT_PER_REQ.items()]
    text += "\n\nThe paper (tokens/s per request, one H100, SGLang, max_tokens 2048):\n\n"
    text += _md_table(["Model", "C=32", "C=64"], paper_rows)
    # per-request throughput at C=32/64 of each series, next to the paper's I-DLM-8B
    pivot = {}
    for e in entries:
        c = e.get("concurrency")
        if c in (32, 64) and e.get("tok_s_per_req") is not None:
            pivot.setdefault(_series_label(e), {})[int(c)] = e["tok_s_per_req"]
    if pivot:
        text += "\n\nThis run at the paper's concurrency levels (tokens/s per request):\n\n"
        text += _md_table(["Series", "C=32", "C=64"],
                          [[k, _fmt(v.get(32)), _fmt(v.get(64))] for k, v in sorted(pivot.items())])
    return text, [{k: e.get(k) for k in (*THROUGHPUT_FIELDS, "source", "dataset", "model")} for e in ordered]


def throughput_plots(entries: list[dict], out: Path) -> list[Path]:
    """tok/s per request and tok/s total against concurrency, one line per series (matplotlib, Agg)."""
    if not entries:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no throughput plots")
        return []
    series: dict[str, list[dict]] = {}
    for e in entries:
        if e.get("concurrency") is None:
            continue
        series.setdefault(_series_label(e), []).append(e)
    written = []
    for field_, fname, ylabel in (("tok_s_per_req", "throughput_per_request.png", "tokens/s per request"),
                                  ("tok_s_total", "throughput_total.png", "tokens/s (all requests)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        drawn = False
        for name, es in sorted(series.items()):
            pts = sorted((float(e["concurrency"]), float(e[field_])) for e in es if e.get(field_) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
                drawn = True
        if field_ == "tok_s_per_req":
            for name, v in THROUGHPUT_PER_REQ.items():
                if name.startswith("I-DLM"):
                    for c, (lo, hi) in v.items():
                        ax.errorbar([c], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], fmt="x", color="black",
                                    capsize=3, label=f"{name} (paper)" if c == 32 else None)
                        drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _thinking(runs: list[dict]) -> str:
    """How the runs were sampled, from their summaries: thinking mode on, off, or mixed."""
    modes = {(b.get("sampling") or {}).get("thinking") for r in runs for b in r["benchmarks"].values()} - {None}
    return {frozenset({True}): "thinking mode", frozenset({False}): "thinking off (--no-thinking)"}.get(
        frozenset(modes), "thinking mode" if not modes else "thinking on in some runs, off in others")


def write_tables(paths: list[str], output: str | Path = "tables", diff: bool = False) -> dict:
    runs, tput = load_results(paths)
    if not runs and not tput:
        raise UserError("found no eval summaries or throughput results under " + ", ".join(map(str, paths)))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    result: dict = {"quality": [], "throughput": []}
    if runs:
        text, data = quality_table(runs, diff=diff)
        header = f"# Quality (accuracy %, {_thinking(runs)})\n\nRuns: " + ", ".join(
            f"`{r['label']}` ({r['dir']})" for r in runs) + "\n\n"
        (out / "quality.md").write_text(header + text + "\n", encoding="utf-8")
        written.append(out / "quality.md")
        result["quality"] = data
    if tput:
        text, data = throughput_table(tput)
        (out / "throughput.md").write_text("# Serving throughput\n\n" + text + "\n", encoding="utf-8")
        written.append(out / "throughput.md")
        written += throughput_plots(tput, out)
        result["throughput"] = data
    (out / "tables.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    written.append(out / "tables.json")
    result["written"] = [str(p) for p in written]
    return result
