"""R-ISD: a gated LoRA on a frozen base AR model, active only on MASK rows.

The adapter is a stock PEFT LoRA directory plus ``idlm_adapter.json`` (mask token id, stride, base model). At load
time every LoRA branch gets a forward hook that multiplies its output by a 0/1 per-row gate, so rows with gate 0 add
exactly ``0`` to the base layer's output: verify rows (pending token and drafts) compute the base model, and
because MASK rows come after them under causal attention and their KV is always trimmed, the accepted tokens follow
the base model's distribution (greedy: its exact output).

The gate of a forward comes from the engine, which knows each row's role (`LoRAGate.rows`); without that (a plain
``model(input_ids)`` call) it falls back to ``input_ids == mask_token_id``, computed in a pre-forward hook on the
input embedding. The gate lives on a `LoRAGate` object attached to the model (``model.idlm_lora_gate``); there is
no module-level state.

MASK id. The MASK input is one embedding row of the *unchanged* base model (resizing would add an lm_head row and
change the base distribution). `save_gated_lora` picks the first row the tokenizer never produces (Qwen3 has 267
such rows; 151669 is the first). A base model with no free row (Llama-style vocabularies) is refused unless a
``mask_token_id`` is given: an existing token id then doubles as the MASK input. That is still lossless inside the
engine, which gates by row role, but the input-id fallback would also switch the LoRA on for genuine occurrences of
that token, and the LoRA has to learn MASK semantics on top of that token's embedding.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from idlm.checkpoint import load_causal_lm
from idlm.config import check_stride
from idlm.errors import UserError

ADAPTER_META_FILE = "idlm_adapter.json"
GATE_ATTR = "idlm_lora_gate"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GatedLoRAConfig:
    """What the engine needs beside the PEFT files. Stored as {"idlm": {...}} in ``idlm_adapter.json``."""

    mask_token_id: int
    stride: int
    base_model: str | None = None
    gated: bool = True

    def save(self, adapter_dir: str | Path) -> None:
        (Path(adapter_dir) / ADAPTER_META_FILE).write_text(json.dumps({"idlm": asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, adapter_dir: str | Path) -> GatedLoRAConfig:
        path = Path(adapter_dir) / ADAPTER_META_FILE
        if not Path(adapter_dir).is_dir():
            raise UserError(f"LoRA adapter not found: {adapter_dir} is not a directory")
        if not path.exists():
            raise UserError(f"{adapter_dir} is not a gated-LoRA adapter: it has no {ADAPTER_META_FILE}")
        try:
            block = json.loads(path.read_text())["idlm"]
            return cls(**block)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from exc


class LoRAGate:
    """The per-row 0/1 gate of every LoRA branch of one model.

    enabled=False switches gating off (LoRA on every row): only to show in tests that the gate matters.
    """

    def __init__(self, mask_token_id: int):
        self.mask_token_id = mask_token_id
        self.enabled = True
        self._explicit: torch.Tensor | None = None  # [B, R] bool, set by the engine for one forward
        self._from_ids: torch.Tensor | None = None  # [B, R] bool, input_ids == mask id of the current forward
        self._handles: list = []
        self._layers: list = []  # the gated PEFT LoRA layers

    @contextmanager
    def rows(self, mask_rows: torch.Tensor) -> Iterator[None]:
        """Gate LoRA on exactly the rows where ``mask_rows`` [B, R] is True for the forwards inside the block."""
        self._explicit = mask_rows
        try:
            yield
        finally:
            self._explicit = None

    @contextmanager
    def bypass(self) -> Iterator[None]:
        """Forwards inside the block have no MASK row: skip every LoRA branch (gate 0 on every row, without
        computing it), so they cost what the base model costs."""
        before = [layer._disable_adapters for layer in self._layers]
        for layer in self._layers:
            layer._disable_adapters = True  # what PEFT's forward reads; enable_adapters() would also touch grads
        try:
            yield
        finally:
            for layer, was in zip(self._layers, before):
                layer._disable_adapters = was

    def _on_embedding(self, module, args, kwargs=None) -> None:
        ids = args[0] if args else (kwargs or {}).get("input")
        self._from_ids = ids == self.mask_token_id if ids is not None else None

    def _on_lora_branch(self, module, args, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        gate = self._explicit if self._explicit is not None else self._from_ids
        if gate is None:
            raise RuntimeError("gated LoRA: no gate for this forward (call the model with input_ids)")
        if tuple(gate.shape) != tuple(output.shape[:-1]):
            raise RuntimeError(f"gated LoRA: gate of shape {tuple(gate.shape)} does not match the LoRA output "
                               f"{tuple(output.shape)}; only linear layers inside the decoder can be gated")
        return output * gate.unsqueeze(-1).to(output.dtype)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def attach_gate(model: torch.nn.Module, mask_token_id: int) -> LoRAGate:
    """Hook a `LoRAGate` into every PEFT LoRA linear layer of ``model`` (a model with LoRA layers injected) and store
    it as ``model.idlm_lora_gate``."""
    from peft.tuners.lora import LoraLayer

    gate = LoRAGate(mask_token_id)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise UserError("the model has no LoRA layers to gate")
    for name, layer in layers:
        if not isinstance(layer.base_layer, torch.nn.Linear) or "lm_head" in name:
            raise UserError(f"gated LoRA supports linear layers inside the decoder only, not {name}")
        if getattr(layer, "lora_variant", None) or any(getattr(layer, "use_dora", {}).values()):
            raise UserError(f"gated LoRA does not support LoRA variants (DoRA, ...) on {name}")
        if getattr(layer, "merged", False):
            raise UserError(f"{name} has merged LoRA weights; a merged adapter cannot be gated")
        if not isinstance(getattr(layer, "_disable_adapters", None), bool):
            raise UserError(f"{name}: this PEFT version's LoRA layers have no _disable_adapters flag to bypass")
        gate._layers.append(layer)
        for branch in layer.lora_B.values():
            gate._handles.append(branch.register_forward_hook(gate._on_lora_branch))
    gate._handles.append(model.get_input_embeddings().register_forward_pre_hook(gate._on_embedding))
    setattr(model, GATE_ATTR, gate)
    return gate


def load_gated_lora(model: torch.nn.Module, adapter_dir: str) -> tuple[torch.nn.Module, GatedLoRAConfig]:
    """Inject the adapter of ``adapter_dir`` into the base ``model`` (frozen, eval mode) and gate it.

    Returns (the base model with gated LoRA layers, the adapter's `GatedLoRAConfig`).
    """
    from peft import PeftModel

    meta = GatedLoRAConfig.load(adapter_dir)
    rows = model.get_input_embeddings().weight.shape[0]
    if not 0 <= meta.mask_token_id < rows:
        raise UserError(f"adapter mask token id {meta.mask_token_id} is not an embedding row of the base model "
                        f"({rows} rows): wrong base model?")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except Exception as exc:  # PEFT raises ValueError/KeyError/OSError with long texts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the LoRA adapter {adapter_dir}: {first}") from exc
    inner = peft_model.get_base_model()
    inner.eval()
    attach_gate(inner, meta.mask_token_id)
    return inner, meta


def free_mask_row(tokenizer, num_rows: int) -> int | None:
    """The first embedding row the tokenizer never produces, or None when every row is a token."""
    n = len(tokenizer)
    return n if n < num_rows else None


def save_gated_lora(
    base: str | torch.nn.Module,
    out_dir: str | Path,
    stride: int = 2,
    mask_token_id: int | None = None,
    tokenizer=None,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    init_std: float = 0.0,
    seed: int = 0,
) -> GatedLoRAConfig:
    """Write an initialised gated-LoRA adapter for ``base`` (a model directory, or a model, which is not modified).

    init_std: 0 gives PEFT's default init (B = 0, a no-op adapter, the start of training); > 0 draws A and B from
        N(0, init_std) with ``seed`` (random non-zero adapters for tests).
    mask_token_id: default the first free embedding row (see the module doc for models without one).
    """
    from peft import LoraConfig, get_peft_model

    check_stride(stride)
    base_name = base if isinstance(base, str) else (getattr(base, "name_or_path", None) or None)
    if isinstance(base, str):
        model, tokenizer = load_causal_lm(base)
    else:
        model = copy.deepcopy(base)
    rows = model.get_input_embeddings().weight.shape[0]
    if mask_token_id is None:
        if tokenizer is None:
            raise UserError("pass mask_token_id (or the tokenizer, to pick a free embedding row)")
        mask_token_id = free_mask_row(tokenizer, rows)
        if mask_token_id is None:
            raise UserError(f"the base model has no free embedding row for MASK (its tokenizer uses all {rows}); "
                            "pass mask_token_id of a rarely used existing token (see idlm.lora)")
    if not 0 <= mask_token_id < rows:
        raise UserError(f"mask token id {mask_token_id} is not an embedding row (the model has {rows})")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in target_modules if t in present]
    if not targets:
        raise UserError(f"none of the LoRA target modules {list(target_modules)} exist in the base model")
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                                  lora_dropout=0.0, bias="none"))
    if init_std > 0:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * init_std)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # LoRA targets linear layers only
    meta = GatedLoRAConfig(mask_token_id=mask_token_id, stride=stride, base_model=base_name)
    meta.save(out)
    return meta


def mask_row_of_token(tokenizer, token: str) -> int:
    """The id of ``token`` as one token of ``tokenizer``: the MASK input of a gated LoRA given by name (for a base
    without a free embedding row, a rarely used special token)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        raise UserError(f"mask_token {token!r} is not a token of the base tokenizer")
    return tid
