"""Which draft mode accepts more for sampled requests (docs/isd.md, idlm.requests.DEFAULT_DRAFT_MODE): R-ISD with
the demo's gated LoRA on the dequantised SmolLM2 base, N = 4, 32 GSM8K test questions (items 200-231), 96 new
tokens, seed 1234, temperatures 1.0 and 0.6, draft modes sample and argmax; pooled TPF and acceptance per position.
--draft-temperatures adds sampled drafts at temperature * tau (SamplingParams.draft_temperature).

    python scripts/dev/draft_mode_tpf.py --base outputs/demo/base [--adapter configs/demo/adapter]
    python scripts/dev/draft_mode_tpf.py --base outputs/demo/base --temperatures 1.0 --modes sample \
        --draft-temperatures 1.0,0.7,0.5,0.35
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from idlm.chat import encode_prompt, stop_token_ids
from idlm.checkpoint import load_causal_lm
from idlm.eval.tasks import BOXED_SUFFIX
from idlm.inference.engine import ISDEngine, SamplingParams, mean_acceptance, pooled_tpf
from idlm.lora import load_gated_lora

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the dequantised SmolLM2 base (outputs/demo/base after the demo)")
    ap.add_argument("--adapter", default=str(ROOT / "configs" / "demo" / "adapter"))
    ap.add_argument("--gsm8k", default=str(ROOT / "data" / "gsm8k" / "test.jsonl"))
    ap.add_argument("--temperatures", default="1.0,0.6")
    ap.add_argument("--modes", default="sample,argmax")
    ap.add_argument("--draft-temperatures", default="1.0", help="for sampled drafts: tau values, comma-separated")
    args = ap.parse_args()
    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    model, tok = load_causal_lm(args.base, dtype="float32")
    gated, meta = load_gated_lora(model, args.adapter)
    rows = [json.loads(line) for line in Path(args.gsm8k).read_text().splitlines()][200:232]
    ids = [encode_prompt(tok, r["question"] + BOXED_SUFFIX) for r in rows]
    stop = stop_token_ids(tok, gated)
    for temperature in floats(args.temperatures):
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            for tau in floats(args.draft_temperatures) if mode == "sample" else [1.0]:
                engine = ISDEngine(gated, tok, stride=meta.stride, mask_token_id=meta.mask_token_id,
                                   max_batch_size=32)
                params = SamplingParams(max_new_tokens=96, temperature=temperature, seed=1234, draft_mode=mode,
                                        stop_token_ids=stop, draft_temperature=tau)
                t0 = time.time()
                outs = engine.generate(ids, params)
                acc = " ".join(f"{a:.3f}" for a in mean_acceptance(outs, meta.stride))
                name = f"{mode}, draft temperature x{tau:g}" if mode == "sample" else mode
                print(f"T={temperature} {name}: TPF {pooled_tpf(outs):.3f}, acceptance {acc}, "
                      f"{sum(len(o.token_ids) for o in outs)} tokens, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
