"""Model FLOPs of a training step and MFU, for the objective and for plain AR SFT.

FLOPs of one forward + backward (weights trainable), counted as matrix multiplies only:

    6 * P_body * T            every token through the decoder layers (P_body: decoder parameters, no embeddings)
  + 6 * d * V * R             rows projected through the LM head (R: rows whose logits are computed)
  + 12 * n_layers * d_attn * A  attention scores and values (A: attended (query, key) pairs; d_attn = heads x head_dim)

For the [x_t | x_0] objective T = K + L per row (K = the x_t rows kept by `idlm.objective.noisy_rows`, L = the
real tokens), R = the noisy plus clean targets (only rows with a target are projected), and a row at position p
sees p + 1 keys in either half (a mask row sees the clean keys before its block plus its own block up to itself),
so A = sum over the real rows of (p + 1) in both halves. For stock AR SFT T = L, R = B x L_padded (the HF model
computes logits for every row) and A = sum of (p + 1) over the real tokens.

MFU = FLOPs / (seconds x devices x peak FLOP/s of one device). Frozen weights (gated LoRA) need no weight
gradients, so 6 overstates their work by about a third; the formula is kept for comparability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.objective import build_inputs, count_targets

# Dense bf16/fp16 tensor-core peak of one device, in TFLOP/s (vendor data sheets).
PEAK_TFLOPS_BF16 = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "RTX 4090": 165.2,
}


@dataclass
class ModelShape:
    body_params: int
    hidden: int
    vocab: int
    layers: int
    attn_dim: int  # heads x head_dim

    @classmethod
    def of(cls, model) -> ModelShape:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        decoder = model.get_decoder()
        seen = {id(emb)}
        body = 0
        for p in decoder.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                body += _numel(p)
        heads = getattr(cfg, "num_attention_heads", 0)
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // max(heads, 1))
        return cls(body, int(head.shape[1] if head.numel() else cfg.hidden_size), int(cfg.vocab_size),
                   int(cfg.num_hidden_layers), int(heads * head_dim))


def _numel(p: torch.Tensor) -> int:
    ds = getattr(p, "ds_numel", None)  # DeepSpeed ZeRO-3 partitions parameters; ds_numel is the full size
    return int(ds if ds is not None else p.numel())


@dataclass
class StepWork:
    """What one (micro-)batch costs: tokens through the decoder, rows through the head, attended pairs."""

    tokens: int = 0  # real (non-padding) tokens of the data, L summed over rows
    model_tokens: int = 0  # tokens through the decoder (K + L for the objective)
    head_rows: int = 0
    attn_pairs: int = 0

    def __iadd__(self, other: StepWork) -> StepWork:
        self.tokens += other.tokens
        self.model_tokens += other.model_tokens
        self.head_rows += other.head_rows
        self.attn_pairs += other.attn_pairs
        return self

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.tokens, self.model_tokens, self.head_rows, self.attn_pairs], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepWork:
        a, b, c, d = (int(x) for x in t.tolist())
        return cls(a, b, c, d)

    def flops(self, shape: ModelShape) -> float:
        return (6.0 * shape.body_params * self.model_tokens + 6.0 * shape.hidden * shape.vocab * self.head_rows
                + 12.0 * shape.layers * shape.attn_dim * self.attn_pairs)


@torch.no_grad()
def objective_work(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None, cfg) -> StepWork:
    """Work of one `idlm.objective.idlm_loss` micro-batch (see the module doc)."""
    inputs = build_inputs(input_ids, labels, cfg.mask_token_id, cfg.block_size, attention_mask,
                          cfg.objective.block_align)
    layout = inputs.layout
    valid = layout.valid
    pos1 = (layout.positions + 1) * valid
    rows = inputs.noisy_index
    is_row = rows >= 0
    src = rows.clamp(min=0)
    row_valid = is_row & valid.gather(1, src)
    noisy_pairs = ((layout.positions.gather(1, src) + 1) * row_valid).sum()
    n_noisy, n_clean = count_targets(torch.where(valid.bool(), labels, torch.full_like(labels, -100)))
    tokens = int(valid.sum())
    return StepWork(tokens, tokens + int(row_valid.sum()), n_noisy + n_clean, int(pos1.sum() + noisy_pairs))


@torch.no_grad()
def ar_work(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> StepWork:
    """Work of a stock HF causal-LM SFT forward + backward (logits for every row)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    tokens = int(valid.sum())
    return StepWork(tokens, tokens, int(input_ids.numel()), int(((pos + 1) * valid).sum()))


def device_peak_tflops(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> float | None:
    """Peak dense TFLOP/s of the device for bf16/fp16 math, when known; None on CPU or for fp32."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" or (dtype is not None and dtype not in (torch.bfloat16, torch.float16)):
        return None
    name = torch.cuda.get_device_name(dev)
    for key in sorted(PEAK_TFLOPS_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS_BF16[key]
    return None


def mfu(flops: float, seconds: float, devices: int, peak_tflops: float | None) -> float | None:
    if not peak_tflops or seconds <= 0:
        return None
    return flops / (seconds * devices * peak_tflops * 1e12)
