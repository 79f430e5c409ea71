"""Plot docs/results/serving_h100/step_time.png: ISD step time and ISD / AR step ratio by concurrency, for each
configuration measured on the H100 (each a folder with the bench_isd.json / bench_ar.json of one device run).

    python scripts/dev/plot_serving_steps.py            # reads and writes under docs/results/serving_h100/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNS = [  # (folder under docs/results/serving_h100, label)
    ("prefill_kernel", "SGLang prefill kernel, no overlap"),
    ("splitkv_no_overlap", "SGLang split-KV kernel, no overlap"),
    ("gqa_no_overlap", "GQA-packed kernel, no overlap"),
    (".", "GQA-packed kernel + overlap (default)"),
]


def steps(path: Path) -> dict[int, float]:
    return {e["concurrency"]: e["step_ms"] for e in json.loads(path.read_text())["results"]}


def main(base: Path = ROOT / "docs/results/serving_h100") -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ar = steps(base / "bench_ar.json")
    cs = sorted(ar)
    ax1.plot(cs, [ar[c] for c in cs], "k--o", label="SGLang AR decode")
    for folder, label in RUNS:
        isd, ar_run = steps(base / folder / "bench_isd.json"), steps(base / folder / "bench_ar.json")
        ax1.plot(cs, [isd[c] for c in cs], "-o", label=f"ISD N=4: {label}")
        ax2.plot(cs, [isd[c] / ar_run[c] for c in cs], "-o", label=label)
    ax2.plot([32, 64], [1.4, 2.1], "r*", markersize=12, label="target (issue)")
    for ax, title in ((ax1, "step time, ms"), (ax2, "ISD step / AR step (same run)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle("Qwen3-8B shape on one H100, SGLang 0.5.15, 512-token prompts")
    fig.tight_layout()
    fig.savefig(base / "step_time.png", dpi=110)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/results/serving_h100")
