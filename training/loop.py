"""The project's own trainer: the objective in a plain PyTorch loop on one device, a trainer choice of the same recipe
(``trainer: idlm``) for machines without LlamaFactory (the CPU demo) and for quick single-device runs. It reads the
stage's chat file (``train_file`` or the generated data) with the tokenizer's own chat template and writes the same
checkpoints and stage markers as the LlamaFactory worker. Multi-GPU training goes through LlamaFactory + DeepSpeed."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from idlm.checkpoint import load_causal_lm, load_idlm
from idlm.config import IDLMConfig, write_idlm_config
from idlm.errors import UserError
from idlm.lora import DEFAULT_TARGETS, GatedLoRAConfig, attach_gate, free_mask_row, mask_row_of_token
from idlm.objective import Teacher, count_targets, idlm_loss
from idlm.training.curriculum import mark_stage_done
from idlm.training.data import collate, encode_chat, load_chat_jsonl
from idlm.training.resume import truncate_log


@dataclass
class LoopTrainConfig:
    steps: int = 20
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_len: int = 256
    seed: int = 0
    log_file: str | None = None  # JSONL of loss components per step
    amp_dtype: str | None = None  # "bfloat16" / "float16": autocast forward (weights and optimizer stay as loaded)
    clean_weight: float | None = None  # fixed w for CE_clean (0: noisy half only, gated-LoRA training); None: cfg's
    epochs: float | None = None  # when set, steps = ceil(epochs * rows / (batch_size * grad_accum))
    log_tags: dict | None = None  # added to every log row (e.g. the stage and stride)


def _lr_at(step: int, cfg: LoopTrainConfig) -> float:
    """Linear warmup then cosine decay to 0."""
    warm = max(1, int(cfg.warmup_ratio * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device, amp_dtype: str | None):
    if not amp_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp_dtype))


def train_loop(model, tokenizer, conversations: list, idlm_cfg: IDLMConfig, cfg: LoopTrainConfig,
                 teacher=None) -> list[dict]:
    """Train ``model`` in place on chat ``conversations`` with the [x_t | x_0] objective; returns the log rows.

    Each optimizer step takes ``batch_size * grad_accum`` conversations (cycling through a seeded shuffle) and
    normalises by that whole step's target counts, so the result does not depend on ``grad_accum``.
    """
    rows = [encode_chat(tokenizer, conv, cfg.max_len) for conv in conversations]
    if cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(rows) / (cfg.batch_size * cfg.grad_accum)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(cfg.seed)
    order: list[int] = []
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    model.train()
    log: list[dict] = []
    log_fh = open(cfg.log_file, "a") if cfg.log_file else None
    bar = tqdm(range(cfg.steps), desc="train", unit="step", mininterval=2.0)
    for step in bar:
        t0 = time.perf_counter()
        micro = []
        for _ in range(cfg.grad_accum):
            while len(order) < cfg.batch_size:
                perm = list(range(len(rows)))
                rng.shuffle(perm)
                order += perm
            micro.append(collate([rows[i] for i in order[: cfg.batch_size]], pad))
            del order[: cfg.batch_size]
        n_noisy = sum(count_targets(b["labels"])[0] for b in micro)
        n_clean = sum(count_targets(b["labels"])[1] for b in micro)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        sums = torch.zeros(5)
        tokens = 0
        weight = cfg.clean_weight
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            with _autocast(device, cfg.amp_dtype):
                out = idlm_loss(model, b["input_ids"], b["labels"], idlm_cfg, b["attention_mask"],
                                num_noisy=n_noisy, num_clean=n_clean, weight=weight, teacher=teacher)
            weight = out.weight  # one clean-loss weight per optimizer step
            out.loss.backward()
            sums += torch.stack([out.sum_noisy.cpu().float(), out.sum_clean.cpu().float(),
                                 out.sum_kl_noisy.cpu().float(), out.sum_kl_clean.cpu().float(),
                                 out.sum_gap_noisy.cpu().float()])
            tokens += int(b["attention_mask"].sum())
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {
            **(cfg.log_tags or {}),
            "step": step + 1,
            "ce_noisy": float(sums[0]) / max(n_noisy, 1),
            "ce_clean": float(sums[1]) / max(n_clean, 1),
            "kl_noisy": float(sums[2]) / max(n_noisy, 1),
            "kl_clean": float(sums[3]) / max(n_clean, 1),
            "accept_gap_noisy": float(sums[4]) / max(n_noisy, 1),
            "weight": float(weight),
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / dt,
        }
        obj = idlm_cfg.objective
        row["loss"] = ((1 - obj.distill_soft) * row["ce_noisy"] + obj.distill_soft * row["kl_noisy"]
                       + obj.distill_accept * row["accept_gap_noisy"]
                       + row["weight"] * row["ce_clean"] + obj.distill_kl * row["kl_clean"])
        log.append(row)
        bar.set_postfix(noisy=f"{row['ce_noisy']:.3f}", clean=f"{row['ce_clean']:.3f}")
        if log_fh:
            log_fh.write(json.dumps(row) + "\n")
            log_fh.flush()
    if log_fh:
        log_fh.close()
    model.eval()
    return log


def save_trained(model, tokenizer, idlm_cfg: IDLMConfig, out_dir: str | Path, train_cfg: LoopTrainConfig) -> None:
    """Save a loadable I-DLM checkpoint (weights, tokenizer, idlm block) plus the training settings."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_idlm_config(model.config, idlm_cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "idlm_train.json").write_text(json.dumps(asdict(train_cfg), indent=2) + "\n")


def _lf_number(lf: dict, key: str, default):
    v = lf.get(key, default)
    return default if v is None else v


def loop_config(lf: dict, log_file: str | None, clean_weight: float | None = None) -> LoopTrainConfig:
    """The loop's settings from a stage's LlamaFactory/HF arguments (the same recipe keys)."""
    steps = int(_lf_number(lf, "max_steps", -1))
    epochs = None if steps > 0 else float(_lf_number(lf, "num_train_epochs", 1.0))
    return LoopTrainConfig(
        steps=steps if steps > 0 else 1, epochs=epochs,
        batch_size=int(_lf_number(lf, "per_device_train_batch_size", 8)),
        grad_accum=int(_lf_number(lf, "gradient_accumulation_steps", 1)),
        lr=float(_lf_number(lf, "learning_rate", 5e-5)), warmup_ratio=float(_lf_number(lf, "warmup_ratio", 0.0)),
        weight_decay=float(_lf_number(lf, "weight_decay", 0.0)),
        max_grad_norm=float(_lf_number(lf, "max_grad_norm", 1.0)), max_len=int(_lf_number(lf, "cutoff_len", 2048)),
        seed=int(_lf_number(lf, "seed", 42)), log_file=log_file,
        amp_dtype="bfloat16" if lf.get("bf16") and torch.cuda.is_available() else None, clean_weight=clean_weight)


def run_loop_stage(plan, stage) -> None:
    """Run one stage of a plan with the project's own loop and write its checkpoint (or adapter) and stage marker."""
    s, lf = stage.settings, stage.lf_args
    files = [c["file"] for c in plan.data_checks if c["kind"] == "train_file"]
    if not files:
        raise UserError(f"stage {s.index}: trainer: idlm reads a chat file (train_file or a generate section)")
    conversations = [conv for f in files for conv in load_chat_jsonl(f)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(int(_lf_number(lf, "seed", 42)))
    objective = s.objective()
    out = Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_file = plan.log_file
    truncate_log(log_file, s.index, 0)  # an unfinished stage starts over: its earlier rows go
    if s.finetuning == "gated_lora":
        from peft import LoraConfig, get_peft_model  # PEFT only for gated-LoRA stages

        base, tok = load_causal_lm(lf["model_name_or_path"], dtype=torch.float32, device=device,
                                   attn_implementation="sdpa")
        rows = base.get_input_embeddings().weight.shape[0]
        mask_id = mask_row_of_token(tok, s.mask_token) if s.mask_token is not None else (
            s.mask_token_id if s.mask_token_id is not None else free_mask_row(tok, rows))
        if mask_id is None:
            raise UserError("gated LoRA needs a MASK row: set mask_token (a rarely used token) or mask_token_id")
        target = lf.get("lora_target", "all")
        targets = list(DEFAULT_TARGETS) if target == "all" else [t.strip() for t in str(target).split(",")]
        rank = int(lf.get("lora_rank", 128))
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=int(lf.get("lora_alpha") or 2 * rank),
                                                     lora_dropout=0.0, target_modules=targets, bias="none"))
        inner = peft_model.get_base_model()
        attach_gate(inner, mask_id)
        cfg = IDLMConfig(mask_token_id=mask_id, stride=s.stride, objective=objective)
        tc = loop_config(lf, log_file, clean_weight=0.0)
        tc.log_tags = {"stage": s.index, "stride": s.stride}
        history = train_loop(inner, tok, conversations, cfg, tc)
        peft_model.save_pretrained(str(out))
        GatedLoRAConfig(mask_token_id=mask_id, stride=s.stride, base_model=lf["model_name_or_path"]).save(out)
    else:
        model, tok, found = load_idlm(lf["model_name_or_path"], dtype=torch.float32, device=device,
                                      attn_implementation="sdpa")
        mask_id = s.mask_token_id if s.mask_token_id is not None else found.mask_token_id
        cfg = IDLMConfig(mask_token_id=mask_id, stride=s.stride, objective=objective)
        teacher = None
        if objective.uses_teacher:
            teacher = Teacher.load(s.teacher, torch.float32, device)
        tc = loop_config(lf, log_file)
        tc.log_tags = {"stage": s.index, "stride": s.stride}
        history = train_loop(model, tok, conversations, cfg, tc, teacher=teacher)
        save_trained(model, tok, cfg, out, tc)
    mark_stage_done(out, {"stage": s.index, "stride": s.stride, "finetuning": s.finetuning, "trainer": "idlm",
                          "global_step": len(history), "idlm": cfg.to_dict(),
                          "metrics": {"first": history[0], "last": history[-1]}})
