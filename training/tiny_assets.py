"""Offline assets for `configs/train/tiny_cpu.yaml`: ``python -m idlm.training.tiny_assets [OUT]`` (default
``outputs/tiny``) writes ``OUT/base`` (a tiny random Qwen3 with a byte-level BPE tokenizer, `idlm.tiny`) and
``OUT/idlm-base`` (the same model converted with `idlm convert`). The chat data ships in ``configs/train/data``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from idlm.config import ObjectiveConfig
from idlm.convert import convert
from idlm.tiny import build_tiny_model


def build_tiny_assets(out: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> dict[str, str]:
    out = Path(out)
    base, idlm_base = out / "base", out / "idlm-base"
    if not (base / "config.json").is_file():
        build_tiny_model(base, arch="qwen3", free_rows=8, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                         dtype=torch.float32)
    if not (idlm_base / "config.json").is_file():
        convert(str(base), str(idlm_base), stride=2, objective=ObjectiveConfig(), dtype="float32")
    return {"base": str(base), "idlm_base": str(idlm_base)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = build_tiny_assets(argv[0] if argv else "outputs/tiny")
    print(f"tiny base model: {paths['base']}\ntiny I-DLM checkpoint: {paths['idlm_base']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
