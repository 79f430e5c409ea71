"""Regional compilation: `torch.compile` each decoder layer of an HF causal LM (not the whole model).

The objective's mask (a flex_attention BlockMask or a dense mask) and the chunked LM-head loss stay outside the
compiled regions; inside a layer, inductor fuses RMSNorm, rotary, SiLU-gating and the residual adds that run as
separate eager kernels otherwise. All layers of a model share one compiled graph (parameters are graph inputs),
so the compile cost is paid once, on the first step.
"""

from __future__ import annotations

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of an HF causal LM (``model.get_decoder().layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list found (get_decoder().layers)")
    return layers


def compile_layers(model: torch.nn.Module, dynamic: bool | None = None) -> int:
    """Compile every decoder layer in place (``Module.compile``); returns how many. ``dynamic`` as in
    `torch.compile` (None: static first, dynamic once a shape changes)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)
