"""What the gated LoRA adds to one 8-row decode forward on this CPU (docs/results/small_scale.md, "The demo on
CPU"): the dequantised SmolLM2 base and the same base with the demo's adapter through PEFT and the gate hooks
(`idlm.lora.attach_gate`), their forwards interleaved over a 200-token cache (5 real rows, 3 MASK rows), the median ms
of the last --reps forwards of each.

    python scripts/dev/lora_forward_cost.py --base outputs/demo/base [--adapter configs/demo/adapter]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from peft import PeftModel

from idlm.checkpoint import load_causal_lm
from idlm.lora import GatedLoRAConfig, attach_gate

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the dequantised SmolLM2 base (outputs/demo/base after the demo)")
    ap.add_argument("--adapter", default=str(ROOT / "configs" / "demo" / "adapter"))
    ap.add_argument("--reps", type=int, default=37)
    args = ap.parse_args()
    meta = GatedLoRAConfig.load(args.adapter)
    base = load_causal_lm(args.base, dtype="float32")[0]
    hooked = PeftModel.from_pretrained(load_causal_lm(args.base, dtype="float32")[0], args.adapter,
                                       is_trainable=False).get_base_model().eval()
    attach_gate(hooked, meta.mask_token_id)
    models = {"base": base, "base + gated LoRA": hooked}
    ctx = 200
    x = torch.randint(0, 1000, (1, 8))
    x[0, 5:] = meta.mask_token_id  # an ISD step at N = 4 padded to 8 rows: 3 MASK rows last
    caches = {n: m(input_ids=torch.randint(0, 1000, (1, ctx)), use_cache=True).past_key_values
              for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for i in range(args.reps + 3):
        for n, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=x, past_key_values=caches[n], use_cache=True)
            caches[n].crop(ctx)
            if i >= 3:  # three warm-up rounds
                times[n].append((time.perf_counter() - t0) * 1000)
    print({n: round(statistics.median(v), 1) for n, v in times.items()})


if __name__ == "__main__":
    main()
