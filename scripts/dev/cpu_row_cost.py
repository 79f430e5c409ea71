"""What one decode forward costs on this CPU by row count, and what the reference engine's row padding buys
(docs/results/small_scale.md, "The demo on CPU").

    python scripts/dev/cpu_row_cost.py --base outputs/demo/base [--adapter configs/demo/adapter]

1. The base model (and, with --adapter, the base with the gated LoRA) over a 200-token cache: ms per forward of
   1, 3, 7 and 8 new rows (the median of --reps forwards).
2. R-ISD in the engine on the demo's first GSM8K question, greedy, 120 new tokens: ms per decode forward with the
   CPU row padding (`ISDEngine._step_width`) and without it, alternating, twice each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from idlm.chat import encode_prompt, stop_token_ids
from idlm.checkpoint import load_causal_lm
from idlm.eval.tasks import BOXED_SUFFIX
from idlm.inference.engine import ISDEngine, SamplingParams
from idlm.lora import load_gated_lora

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def forward_ms(model, rows: int, reps: int, ctx: int = 200) -> float:
    cache = model(input_ids=torch.randint(0, 1000, (1, ctx)), use_cache=True).past_key_values
    x = torch.randint(0, 1000, (1, rows))
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        model(input_ids=x, past_key_values=cache, use_cache=True)
        cache.crop(ctx)
        if i >= 2:  # two warm-up forwards
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the dequantised SmolLM2 base (outputs/demo/base after the demo)")
    ap.add_argument("--adapter", default=str(ROOT / "configs" / "demo" / "adapter"))
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    base, tok = load_causal_lm(args.base, dtype="float32")
    gated, meta = load_gated_lora(load_causal_lm(args.base, dtype="float32")[0], args.adapter)
    report: dict = {"threads": torch.get_num_threads()}
    for name, model in (("base", base), ("gated", gated)):
        report[f"{name}_ms_by_rows"] = {r: round(forward_ms(model, r, args.reps), 1) for r in (1, 3, 7, 8)}
        print(name, report[f"{name}_ms_by_rows"], flush=True)

    question = json.loads((ROOT / "configs" / "demo" / "prompts.json").read_text())["r_isd"][0]
    ids = [encode_prompt(tok, question + BOXED_SUFFIX)]
    params = SamplingParams(max_new_tokens=120, temperature=0.0, stop_token_ids=stop_token_ids(tok, base))
    report["r_isd_ms_per_forward"] = {"padded": [], "unpadded": []}
    for padded in (False, True, False, True):
        engine = ISDEngine(gated, tok, stride=meta.stride, mask_token_id=meta.mask_token_id, max_batch_size=1)
        if not padded:
            engine._step_width = lambda need, batch, n, context: need
        engine.generate(ids, params)  # warm-up
        t0 = time.perf_counter()
        out = engine.generate(ids, params)[0]
        ms = (time.perf_counter() - t0) * 1000 / out.forwards
        report["r_isd_ms_per_forward"]["padded" if padded else "unpadded"].append(round(ms, 1))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
