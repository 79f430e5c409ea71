"""Self-distillation data: the base model's own greedy answers to a list of prompts, as chat JSONL rows.

Training an I-DLM on its base model's own outputs keeps the AR distribution where it was and teaches the mask
rows to predict what the model itself will say, which is what ISD's acceptance rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy chat answers of ``model`` to ``prompts`` (left-padded batches through HF generate)."""
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:  # e.g. SmolLM2's GGUF tokenizer; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    stop = stop_token_ids(model, tokenizer)
    answers: list[str] = []
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="distill", unit="batch"):
            chunk = prompts[i: i + batch_size]
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop),
                                 pad_token_id=pad)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return answers


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-turn ids: the tokenizer's EOS, the generation config's EOS ids and ChatML's <|im_end|> if present."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return ids


def write_distill_jsonl(path: str | Path, prompts: list[str], answers: list[str]) -> None:
    with Path(path).open("w") as fh:
        for p, a in zip(prompts, answers):
            if a:
                fh.write(json.dumps({"messages": [{"role": "user", "content": p},
                                                  {"role": "assistant", "content": a}]}) + "\n")
