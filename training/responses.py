"""Training data as the paper makes it: the base model's own *sampled* responses to a mix of prompt sources.

Training an I-DLM on responses of the model it starts from keeps its AR distribution where it was and teaches the
MASK rows what the model itself is likely to say, which is what ISD's acceptance rewards. Sampling (rather than
greedy decoding) with the model's generation settings, several responses per prompt, covers its distribution
instead of one mode of it.

Prompt sources (`read_prompt_sources`):
    gsm8k    JSONL with a ``question`` field (GSM8K train); the prompt is the question plus the boxed-answer
             instruction that `idlm eval` adds, so training prompts look like evaluation prompts
    mbpp     Google's sanitized-mbpp.json; only task ids outside the test split 11..510 are used, in the prompt
             format of `idlm eval`'s MBPP
    prompts  JSONL with a ``prompt`` field, or a JSON list of strings (or a JSON object whose ``field`` is one)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from idlm.chat import stop_token_ids
from idlm.checkpoint import load_causal_lm
from idlm.errors import UserError
from idlm.eval.tasks import BOXED_SUFFIX, MBPP_TEMPLATE
from idlm.training.datacheck import iter_rows

MBPP_TEST_IDS = range(11, 511)  # Google's test split of MBPP: held out, never a training prompt


@dataclass
class GenerationSettings:
    """How responses are sampled. None for temperature / top_p / top_k: the base model's generation_config.json,
    and where it has none, plain sampling (temperature 1, no truncation)."""

    samples_per_prompt: int = 2
    max_new_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    batch_size: int = 64
    seed: int = 0
    keep_truncated: bool = False  # keep responses cut at max_new_tokens (no end of turn); default: drop them

    def resolved(self, generation_config: Any) -> dict[str, Any]:
        """The sampling arguments for ``model.generate``: recipe values first, then the model's own."""
        def pick(name: str, default):
            mine = getattr(self, name)
            if mine is not None:
                return mine
            theirs = getattr(generation_config, name, None) if generation_config is not None else None
            model_samples = generation_config is not None and getattr(generation_config, "do_sample", False)
            return theirs if (theirs is not None and model_samples) else default

        out = {"temperature": float(pick("temperature", 1.0)), "top_p": float(pick("top_p", 1.0)),
               "top_k": int(pick("top_k", 0) or 0)}
        if not out["temperature"] > 0:
            raise UserError(f"generate.temperature must be > 0 for sampled responses, got {out['temperature']}")
        if not 0 < out["top_p"] <= 1:
            raise UserError(f"generate.top_p must be in (0, 1], got {out['top_p']}")
        return out


def read_prompt_sources(sources: list[dict[str, Any]]) -> list[str]:
    """User prompts from ``[{kind, file, limit}]`` (see the module doc), in source order, duplicates removed."""
    prompts: list[str] = []
    for src in sources:
        path, kind, limit = Path(src["file"]), src["kind"], src.get("limit")
        if not path.is_file():
            raise UserError(f"prompt source not found: {path}")
        got: list[str] = []
        if kind == "gsm8k":
            for n, row in iter_rows(path):
                if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                    raise UserError(f"{path} row {n}: a GSM8K row needs a text field 'question'")
                got.append(row["question"] + BOXED_SUFFIX)
        elif kind == "mbpp":
            for n, r in iter_rows(path):
                if not isinstance(r, dict) or "task_id" not in r or not isinstance(r.get("test_list"), list):
                    raise UserError(f"{path} row {n}: an MBPP task needs task_id and test_list")
                if int(r["task_id"]) in MBPP_TEST_IDS:
                    continue
                text = r.get("prompt") or r.get("text")
                got.append(MBPP_TEMPLATE.format(prompt=text, tests="\n".join(r["test_list"])))
        elif kind == "prompts":
            if path.suffix == ".json":
                rows = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(rows, dict) and src.get("field"):
                    rows = rows.get(src["field"])
                if not isinstance(rows, list) or not all(isinstance(x, str) for x in rows):
                    raise UserError(f"{path}: a prompts .json file must be a list of strings"
                                    + (f" under '{src['field']}'" if src.get("field") else ""))
                got = list(rows)
            else:
                for n, row in iter_rows(path):
                    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                        raise UserError(f"{path} row {n}: needs a text field 'prompt'")
                    got.append(row["prompt"])
        else:
            raise UserError(f"unknown prompt source kind {kind!r}")
        prompts += got[:limit] if limit is not None else got
    seen: set[str] = set()
    unique = [p for p in prompts if not (p in seen or seen.add(p))]
    if not unique:
        raise UserError("the prompt sources hold no prompts")
    return unique


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], settings: GenerationSettings) -> list[list[str]]:
    """``settings.samples_per_prompt`` sampled chat responses per prompt (left-padded batches through HF generate;
    prompts sorted by length so batches pad little). Empty responses are kept as "" (dropped by the writer)."""
    args = settings.resolved(getattr(model, "generation_config", None))
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:  # e.g. SmolLM2's GGUF tokenizer; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    stop = list(stop_token_ids(tokenizer, model))
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(settings.seed)
    n = settings.samples_per_prompt
    per_batch = max(1, settings.batch_size // n)
    try:
        for start in tqdm(range(0, len(order), per_batch), desc="generate", unit="batch"):
            idx = order[start:start + per_batch]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=settings.max_new_tokens, do_sample=True,
                                 num_return_sequences=n, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
                                 **args)
            rows = gen[:, enc["input_ids"].shape[1]:].tolist()
            for j, row in enumerate(rows):
                cut = next((k for k, t in enumerate(row) if t in stop), None)
                if cut is None and not settings.keep_truncated:  # cut at the length limit: not a complete answer
                    out[idx[j // n]].append("")
                    continue
                out[idx[j // n]].append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token
    return out


def write_chat_jsonl(path: str | Path, prompts: list[str], responses: list[list[str]], seed: int = 0) -> int:
    """Write one {"messages": [user, assistant]} row per non-empty response, shuffled; returns the row count."""
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, rs in zip(prompts, responses) for r in rs if r]
    random.Random(seed).shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(rows)


def generate_training_data(model_path: str, prompts: list[str], settings: GenerationSettings, output: str | Path,
                           dtype: str = "bfloat16") -> dict[str, Any]:
    """Sample the responses of the model at ``model_path`` and write the chat JSONL; returns a short report."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_causal_lm(model_path, dtype=dtype if device == "cuda" else "float32", device=device)
    model.eval()
    t0 = time.time()
    responses = sample_responses(model, tok, prompts, settings)
    rows = write_chat_jsonl(output, prompts, responses, settings.seed)
    if rows == 0:
        raise UserError(f"generate: no complete response (all {len(prompts) * settings.samples_per_prompt} hit "
                        f"max_new_tokens={settings.max_new_tokens}); raise it")
    report = {"prompts": len(prompts), "rows": rows, "seconds": time.time() - t0,
              "truncated": sum(r == "" for rs in responses for r in rs),
              "sampling": settings.resolved(getattr(model, "generation_config", None))}
    Path(output).with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
