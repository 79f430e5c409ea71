"""R-ISD under SGLang: a gated LoRA inside SGLang's own model, active only on MASK rows.

SGLang's LoRA manager gives each request one adapter (one segment per request), so it cannot switch an adapter on
for some rows of a request and off for others. R-ISD needs exactly that: the verify rows (pending token, drafts)
must run the base weights and only the MASK rows the adapter. This module therefore leaves SGLang's LoRA machinery
alone and wraps the served model's fused projections instead:

* every decoder layer's ``self_attn.qkv_proj``, ``self_attn.o_proj``, ``mlp.gate_up_proj`` and ``mlp.down_proj``
  (SGLang's Llama / Qwen2 / Qwen3 layout, tensor parallel size 1) becomes `GatedLoRALinear`: the base layer's output
  plus ``gate[:, None] * (x A^T) B^T``, where A stacks the adapter's A matrices of the HF projections that SGLang
  fused (q/k/v, gate/up) and B is block-diagonal with the scale folded in;
* the gate is ``input_ids == mask_token_id`` of the current forward, computed by a wrapper of the model's
  ``forward``. In an ISD step the MASK rows are exactly the rows whose input is MASK: the adapter's MASK id is an
  embedding row the tokenizer never produces (`idlm.lora.save_gated_lora`), so prompts never hold it.
  Computed inside the forward, it is captured into the decode CUDA graphs with the rest.

Rows with gate 0 add ``delta * 0 = 0`` to the base output, which leaves it bit-identical: verify rows, and so every
accepted token, follow the base model exactly (greedy: its output). Pure PyTorch (no SGLang import), tested on CPU
against PEFT (tests/test_sglang_gated_lora.py); the SGLang wiring is in the worker.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from idlm.errors import UserError

log = logging.getLogger(__name__)

# SGLang's fused projection (attribute path in a decoder layer) -> the HF projections it concatenates, in order.
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


class RowGate:
    """The 0/1 gate of the current forward: ``mask`` [T] bool, one entry per token row of the batch."""

    def __init__(self, mask_token_id: int):
        self.mask_token_id = int(mask_token_id)
        self.mask: torch.Tensor | None = None

    def set_from_ids(self, input_ids: torch.Tensor) -> None:
        self.mask = input_ids.reshape(-1) == self.mask_token_id


LoRAWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_peft_adapter(adapter_dir: str | Path) -> tuple[LoRAWeights, float]:
    """The LoRA matrices of a PEFT adapter directory: {(layer index, HF projection name): (A [r, in], B [out, r])}
    and the scale (lora_alpha / r, or / sqrt(r) with rsLoRA). Refuses what `GatedLoRALinear` cannot express."""
    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d} is not a PEFT LoRA adapter: it has no adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise UserError(f"{cfg_path}: {key}=true is not supported by the SGLang gated LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise UserError(f"{cfg_path}: per-module {key} is not supported by the SGLang gated LoRA")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / (r**0.5) if cfg.get("use_rslora") else alpha / r
    weights_path = d / "adapter_model.safetensors"
    if weights_path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
    elif (d / "adapter_model.bin").is_file():
        state = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{d} has no adapter_model.safetensors (or .bin)")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.search(key)
        if m is None:
            raise UserError(f"{weights_path.name}: unexpected tensor {key} (only LoRA A/B of decoder projections "
                            "are supported)")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    out = {}
    for (layer, name), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights_path.name}: layer {layer} {name} has lora_{'A' if 'A' in ab else 'B'} only")
        out[(layer, name)] = (ab["A"], ab["B"])
    if not out:
        raise UserError(f"{weights_path.name} holds no LoRA weights")
    return out, scale


class GatedLoRALinear(torch.nn.Module):
    """``base`` (an SGLang linear layer returning ``(output, bias)``, or a plain module returning a tensor) plus a
    LoRA delta on the rows where ``gate.mask`` is True.

    A: [R, in] (the stacked A of the fused projections, R = sum of their ranks); B: [out, R] block-diagonal, scale
    folded in. Output rows with gate 0 are the base output unchanged (bit for bit).
    """

    def __init__(self, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, gate: RowGate):
        super().__init__()
        self.base = base
        self.gate = gate
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_B", B, persistent=False)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base(x, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        mask = self.gate.mask
        if mask is None or mask.shape[0] != x.shape[0]:
            got = None if mask is None else tuple(mask.shape)
            raise RuntimeError(f"gated LoRA: gate {got} does not match the {x.shape[0]} rows of this projection")
        delta = (x.to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        y = y + (delta * mask.unsqueeze(-1).to(delta.dtype)).to(y.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y


def _fused_factors(parts: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack A's and build the block-diagonal B of fused projections: x A^T B^T = cat(x A_i^T B_i^T * scale)."""
    A = torch.cat([a for a, _ in parts], dim=0)
    B = torch.block_diag(*[b * scale for _, b in parts])
    return A, B


def install_gated_lora(model: torch.nn.Module, adapter_dir: str | Path, mask_token_id: int,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> RowGate:
    """Wrap ``model.model.layers[i]``'s fused projections with the adapter's gated LoRA and ``model.forward`` with the
    gate computation. Returns the `RowGate`. Call before CUDA graphs are captured."""
    weights, scale = read_peft_adapter(adapter_dir)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"gated LoRA: {type(model).__name__} has no model.layers (Llama/Qwen layouts only)")
    gate = RowGate(mask_token_id)
    used: set[tuple[int, str]] = set()
    wrapped = 0
    for i, layer in enumerate(layers):
        for path, hf_names in FUSED_PROJECTIONS.items():
            present = [n for n in hf_names if (i, n) in weights]
            if not present:
                continue
            if len(present) != len(hf_names):
                missing = sorted(set(hf_names) - set(present))
                raise UserError(f"gated LoRA: layer {i} adapts {present} but not {missing}; SGLang fuses "
                                f"{'/'.join(hf_names)} into {path}, so adapt all of them or none")
            parent_path, attr = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr, None)
            if base is None:
                raise UserError(f"gated LoRA: layer {i} of {type(model).__name__} has no {path}")
            A, B = _fused_factors([weights[(i, n)] for n in hf_names], scale)
            ref = next(base.parameters(), None)
            A = A.to(device=device or (ref.device if ref is not None else None), dtype=dtype or A.dtype)
            B = B.to(device=A.device, dtype=A.dtype)
            setattr(parent, attr, GatedLoRALinear(base, A, B, gate))
            used.update((i, n) for n in hf_names)
            wrapped += 1
    unused = sorted(set(weights) - used)
    if unused:
        raise UserError(f"gated LoRA: {len(unused)} adapted projections have no place in the served model, e.g. "
                        f"layer {unused[0][0]} {unused[0][1]} (wrong base model?)")
    forward = model.forward

    def gated_forward(input_ids, *args, **kwargs):
        gate.set_from_ids(input_ids)
        return forward(input_ids, *args, **kwargs)

    model.forward = gated_forward
    log.info("gated LoRA (R-ISD): %d projections of %d layers wrapped from %s, MASK id %d", wrapped, len(layers),
             adapter_dir, mask_token_id)
    return gate
