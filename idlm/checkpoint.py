"""Loading base models and I-DLM checkpoints (plain HF causal-LM directories, no remote code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from idlm.config import IDLMConfig, read_idlm_config
from idlm.errors import UserError


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_config(path: str, gguf_file: str | None = None):
    """AutoConfig of a local directory or hub id, with a one-line UserError when it cannot be read."""
    from transformers import AutoConfig

    if not Path(path).exists() and not _looks_like_hub_id(path):
        raise UserError(f"model not found: {path!r} is neither a directory nor a hub id (owner/name)")
    if Path(path).is_dir() and gguf_file is None and not (Path(path) / "config.json").exists():
        raise UserError(f"not a model directory: {path} has no config.json")
    try:
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError with long texts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read a model config from {path}: {first}") from exc


def is_causal_lm_config(config: Any) -> bool:
    """True when transformers has a causal-LM class for this config's model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def require_causal_lm(config: Any, path: str) -> None:
    if not is_causal_lm_config(config):
        raise UserError(
            f"{path} is not a causal language model (model_type={getattr(config, 'model_type', None)!r}, "
            f"architectures={getattr(config, 'architectures', None)}); I-DLM needs a decoder-only LM"
        )


def load_causal_lm(
    path: str,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
):
    """(model, tokenizer) of a causal LM; the model is in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(path, gguf_file)
    require_causal_lm(config, path)
    kwargs: dict[str, Any] = {"dtype": dtype, "gguf_file": gguf_file}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_idlm(path: str, **kwargs):
    """(model, tokenizer, IDLMConfig) of an I-DLM checkpoint made by `idlm convert` or `idlm train`."""
    cfg = read_idlm_config(load_config(path))
    if cfg is None:
        raise UserError(f"{path} is not an I-DLM checkpoint (no 'idlm' block in config.json); run `idlm convert`")
    model, tokenizer = load_causal_lm(path, **kwargs)
    return model, tokenizer, cfg


def idlm_config_of(path: str) -> IDLMConfig | None:
    """The I-DLM block of a checkpoint directory, or None for a plain AR model."""
    return read_idlm_config(load_config(path))
