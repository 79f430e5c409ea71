"""Small builders shared by several test modules."""

from __future__ import annotations

import torch

from idlm.losses import IGNORE_INDEX
from idlm.tiny import tiny_config


def tiny_model(arch: str = "qwen3", vocab_size: int = 64, dtype=torch.float64, seed: int = 0, **kw):
    """A random tiny causal LM (no tokenizer) in eval mode; float64 for exactness tests."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, vocab_size=vocab_size, attn_implementation="sdpa", **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def random_batch(rows: list[tuple[int, int, int]], vocab: int, seed: int = 0, left_pad: bool = False):
    """input_ids, labels, attention_mask [B, L] for rows given as (prompt_len, response_len, pad_len)."""
    g = torch.Generator().manual_seed(seed)
    L = max(p + r + pad for p, r, pad in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE_INDEX)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (p, r, _) in enumerate(rows):
        n = p + r
        toks = torch.randint(1, vocab - 1, (n,), generator=g)
        sl = slice(L - n, L) if left_pad else slice(0, n)
        ids[i, sl] = toks
        mask[i, sl] = 1
        lab = toks.clone()
        lab[:p] = IGNORE_INDEX
        labels[i, sl] = lab
    return ids, labels, mask


def write_recipe(tmp_path, body: dict) -> str:
    """``body`` as a recipe YAML file in ``tmp_path``; returns its path."""
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(body))
    return str(p)
