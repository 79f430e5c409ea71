"""A small training loop for the objective in plain PyTorch: for demos, tests and single-device runs.
Multi-GPU training with DeepSpeed goes through the LlamaFactory extension instead."""

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

from idlm.config import IDLMConfig
from idlm.objective import count_targets, idlm_loss
from idlm.training.data import collate, encode_chat


@dataclass
class NativeTrainConfig:
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


def _lr_at(step: int, cfg: NativeTrainConfig) -> float:
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


def train_native(model, tokenizer, conversations: list, idlm_cfg: IDLMConfig, cfg: NativeTrainConfig) -> list[dict]:
    """Train ``model`` in place on chat ``conversations`` with the [x_t | x_0] objective; returns the log rows.

    Each optimizer step takes ``batch_size * grad_accum`` conversations (cycling through a seeded shuffle) and
    normalises by that whole step's target counts, so the result does not depend on ``grad_accum``.
    """
    rows = [encode_chat(tokenizer, conv, cfg.max_len) for conv in conversations]
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
        sums = torch.zeros(2)
        tokens = 0
        weight = cfg.clean_weight
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            with _autocast(device, cfg.amp_dtype):
                out = idlm_loss(model, b["input_ids"], b["labels"], idlm_cfg, b["attention_mask"],
                                num_noisy=n_noisy, num_clean=n_clean, weight=weight)
            weight = out.weight  # one clean-loss weight per optimizer step
            out.loss.backward()
            sums += torch.stack([out.sum_noisy.cpu().float(), out.sum_clean.cpu().float()])
            tokens += int(b["attention_mask"].sum())
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "ce_noisy": float(sums[0]) / max(n_noisy, 1),
            "ce_clean": float(sums[1]) / max(n_clean, 1),
            "weight": float(weight),
            "lr": opt.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / dt,
        }
        row["loss"] = row["ce_noisy"] + row["weight"] * row["ce_clean"]
        log.append(row)
        bar.set_postfix(noisy=f"{row['ce_noisy']:.3f}", clean=f"{row['ce_clean']:.3f}")
        if log_fh:
            log_fh.write(json.dumps(row) + "\n")
            log_fh.flush()
    if log_fh:
        log_fh.close()
    model.eval()
    return log


def save_trained(model, tokenizer, idlm_cfg: IDLMConfig, out_dir: str | Path, train_cfg: NativeTrainConfig) -> None:
    """Save a loadable I-DLM checkpoint (weights, tokenizer, idlm block) plus the training settings."""
    from idlm.config import write_idlm_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_idlm_config(model.config, idlm_cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "idlm_train.json").write_text(json.dumps(asdict(train_cfg), indent=2) + "\n")
