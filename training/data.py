"""Chat data for the objective without LlamaFactory: JSONL loading with row-level errors, tokenisation with
labels on assistant turns only, and padding into batches."""

from __future__ import annotations

from pathlib import Path

import torch

from idlm.errors import UserError
from idlm.losses import IGNORE_INDEX
from idlm.requests import show
from idlm.training.datacheck import iter_rows

ROLES = ("system", "user", "assistant")


def _ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def validate_messages(messages, where: str) -> list[dict[str, str]]:
    """Check one conversation; ``where`` (e.g. 'data.jsonl row 7') prefixes every error."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {i} needs 'role' and 'content'")
        role = m["role"]
        if not isinstance(role, str) or role not in ROLES or not isinstance(m["content"], str):
            shown = show(role) if isinstance(role, str) else f"a {type(role).__name__}"
            raise UserError(f"{where}: message {i} has role {shown} (one of {ROLES}) or non-text content")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise UserError(f"{where}: the last message must be a non-empty assistant response")
    return messages


def load_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file of {"messages": [{"role", "content"}, ...]} rows.

    Rows are read by the `idlm train` pre-flight reader (training/datacheck.py), so encoding errors, deep nesting and
    the like stop at their row with the same one-line errors."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    out = []
    for n, row in iter_rows(path):
        if not isinstance(row, dict) or "messages" not in row:
            raise UserError(f"{path} row {n}: missing field 'messages'")
        out.append(validate_messages(row["messages"], f"{path} row {n}"))
    if not out:
        raise UserError(f"{path}: no rows")
    return out


def encode_chat(tokenizer, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation through the tokenizer's chat template; labels are -100 except
    on assistant turns (their text and end-of-turn tokens). Truncated to ``max_len`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _ids(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True))
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise UserError("the chat template does not render conversations as growing prefixes; "
                            "cannot locate assistant tokens")
        labels += [IGNORE_INDEX] * (len(prefix) - len(ids)) + full[len(prefix):]
        ids = full
    return ids[:max_len], labels[:max_len]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (input_ids, labels) rows into input_ids, labels, attention_mask [B, L]."""
    L = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.full((len(rows), L), pad_id, dtype=torch.long),
        "labels": torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), L, dtype=torch.long),
    }
    for i, (ids, lab) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(lab)] = torch.tensor(lab)
        batch["attention_mask"][i, : len(ids)] = 1
    return batch
