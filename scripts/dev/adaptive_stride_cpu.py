"""Load-adaptive stride against every fixed stride, on this machine (docs/results/small_scale.md, "Adaptive stride
on CPU"): the demo's R-ISD setting (the dequantised SmolLM2 base with the committed gated LoRA), the demo's
held-out GSM8K prompts, greedy, one request at a time. Each prompt is decoded at N = 1 (AR), 2, 3, 4 and with
`idlm.adaptive.AdaptiveStride` (step costs measured at start-up), in turn, so that a drifting machine slows all
alike. Prints tokens/s, TPF and the strides the policy chose; the outputs must be the AR output in every case.

    python scripts/dev/adaptive_stride_cpu.py --base outputs/demo/base [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from idlm.adaptive import AdaptiveStride
from idlm.chat import encode_prompt, stop_token_ids
from idlm.checkpoint import load_causal_lm
from idlm.eval.tasks import BOXED_SUFFIX
from idlm.inference.engine import ISDEngine, SamplingParams, pooled_tpf
from idlm.lora import load_gated_lora

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the dequantised SmolLM2 base (outputs/demo/base after the demo)")
    ap.add_argument("--adapter", default=str(ROOT / "configs" / "demo" / "adapter"))
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    base, tok = load_causal_lm(args.base, dtype="float32")
    gated, meta = load_gated_lora(load_causal_lm(args.base, dtype="float32")[0], args.adapter)
    prompts = json.loads((ROOT / "configs" / "demo" / "prompts.json").read_text())["r_isd"]
    ids = [encode_prompt(tok, q + BOXED_SUFFIX) for q in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                            stop_token_ids=stop_token_ids(tok, base))
    engines = {"N=1 (AR, base)": ISDEngine(base, tok, stride=1, mask_token_id=None, max_batch_size=1)}
    for n in range(2, meta.stride + 1):
        engines[f"N={n}"] = ISDEngine(gated, tok, stride=n, mask_token_id=meta.mask_token_id, max_batch_size=1)
    adaptive = ISDEngine(gated, tok, stride=meta.stride, mask_token_id=meta.mask_token_id, max_batch_size=1)
    t0 = time.perf_counter()
    table = adaptive.measure_step_costs([1])
    print(f"step costs at batch 1 (ms, N = 1..{meta.stride}): {[round(1e3 * s, 1) for s in table.seconds[0]]}, "
          f"measured in {time.perf_counter() - t0:.1f} s")
    adaptive.stride_policy = AdaptiveStride(meta.stride, table)
    engines["adaptive"] = adaptive
    for engine in engines.values():
        engine.generate(ids[:1], params)  # warm-up
    outs = {name: [] for name in engines}
    seconds = dict.fromkeys(engines, 0.0)
    for prompt in ids:
        for name, engine in engines.items():
            t0 = time.perf_counter()
            outs[name] += engine.generate([prompt], params)
            seconds[name] += time.perf_counter() - t0
    ar = outs["N=1 (AR, base)"]
    tokens = sum(len(o.token_ids) for o in ar)
    rows = {}
    for name in engines:
        same = sum(a.token_ids == o.token_ids for a, o in zip(ar, outs[name]))
        rows[name] = {"seconds": round(seconds[name], 2), "tokens_per_s": round(tokens / seconds[name], 2),
                      "tpf": round(pooled_tpf(outs[name]), 3), "identical_to_ar": f"{same}/{len(ids)}"}
        print(f"{name:16s} {tokens} tokens in {seconds[name]:6.1f} s = {tokens / seconds[name]:5.1f} tokens/s, "
              f"TPF {rows[name]['tpf']:.2f}, identical to AR {same}/{len(ids)}")
    chosen = adaptive.stride_policy.chosen
    print(f"adaptive: steps at each N {dict(sorted(chosen.items()))}; acceptance estimate "
          f"{[round(a, 3) for a in adaptive.stride_policy.acceptance]}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "step_costs": table.to_json(), "chosen": chosen,
                                              "acceptance": adaptive.stride_policy.acceptance,
                                              "torch_threads": torch.get_num_threads()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
