"""The all-masked [x_t | x_0] training objective.

For a row with clean ids x_0 (length L) and labels (-100 outside the supervised response tokens):

* x_t = x_0 with every supervised position replaced by the MASK id (all-masked, t = 1);
* the model reads [x_t | x_0] (length 2L), both halves with the same position ids;
* attention follows `idlm.masks`; the hidden state at position i predicts token i + 1 in both halves;
* loss = CE_noisy + w * CE_clean, each a *sum* over the micro-batch divided by a normaliser that the
  caller may set to the supervised-target count of the whole global batch (all accumulation steps and
  ranks), so k micro-batches with accumulation give exactly the loss and gradients of one big batch.
* distillation (optional, `Teacher`): with p the frozen teacher's next-token distribution at the same position,
  the noisy term becomes (1 - s) * CE_noisy + s * KL(p || q_noisy) (s = ``distill_soft``) and the clean term
  gains k * KL(p || q_clean) (k = ``distill_kl``); with a = ``distill_accept`` the noisy term also gains
  a * (1 - sum_x min(p, q_noisy)), the miss rate of a draft sampled from q (`idlm.ceiling`); same normalisers,
  and the teacher's logits, like the model's, exist only one chunk at a time.

Nothing here depends on LlamaFactory; the trainer in `idlm.training` calls `idlm_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from idlm.config import IDLMConfig, ObjectiveConfig
from idlm.losses import IGNORE_INDEX, linear_cross_entropy_sum, linear_mixed_cross_entropy_sum
from idlm.masks import (
    SequenceLayout,
    additive_mask,
    compute_block_ids,
    dense_mask,
    flex_block_mask,
    positions_from_mask,
)


@dataclass
class IDLMInputs:
    """Model inputs and targets for one micro-batch (K = number of x_t rows kept, L = row length).

    input_ids:     [B, K + L] the concatenation [x_t rows | x_0].
    position_ids:  [B, K + L] the x_t rows keep their original positions; x_0 is 0..L-1 over real tokens.
    noisy_index:   [B, K] original position of each x_t row (-1 for padding rows).
    noisy_targets: [B, K] target of each x_t row (token i+1 where i is masked and i+1 supervised).
    clean_targets: [B, L] target of the x_0 hidden state at i (label i+1: ordinary shifted SFT targets).
    layout:        per-position attributes of the rows, used by the attention rule.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    noisy_index: torch.Tensor
    noisy_targets: torch.Tensor
    clean_targets: torch.Tensor
    layout: SequenceLayout

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def num_noisy_rows(self) -> int:
        return self.noisy_index.shape[1]


@dataclass
class LossOutput:
    """The combined loss and its parts. ``loss`` carries the graph; the rest are detached.

    ce_noisy / ce_clean: this micro-batch's summed CE divided by the normaliser that was used.
    sum_* / n_*: the raw summed CE and target counts of this micro-batch (for logging and all-reduce).
    sum_kl_noisy / sum_kl_clean: summed KL(teacher || model) of each half (zeros without a teacher).
    """

    loss: torch.Tensor
    ce_noisy: torch.Tensor
    ce_clean: torch.Tensor
    weight: torch.Tensor
    sum_noisy: torch.Tensor
    sum_clean: torch.Tensor
    n_noisy: int
    n_clean: int
    sum_kl_noisy: torch.Tensor | None = None
    sum_kl_clean: torch.Tensor | None = None
    sum_gap_noisy: torch.Tensor | None = None  # summed 1 - sum_x min(p, q) over noisy targets (with a teacher)


@dataclass
class Teacher:
    """A frozen HF causal LM whose next-token distribution is the distillation target (the model before
    conversion: at initialisation the clean half equals it and KL is 0). Same vocabulary as the student; it reads
    x_0 only, as a plain causal LM, under no_grad."""

    model: torch.nn.Module

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, device) -> Teacher:
        """The teacher from a checkpoint: eval mode, no gradients, on ``device``. It is not part of the trained
        model, so neither DDP nor DeepSpeed wraps or shards it (each rank holds a copy)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device).eval().requires_grad_(False))

    @torch.no_grad()
    def hidden_states(self, inputs: IDLMInputs) -> torch.Tensor:
        """Final-norm hidden states [B, L, d_t] of the teacher on the clean rows x_0 of ``inputs``."""
        K = inputs.num_noisy_rows
        valid = inputs.layout.valid
        out = self.model.get_decoder()(input_ids=inputs.input_ids[:, K:], position_ids=inputs.position_ids[:, K:],
                                       attention_mask=valid.long(), use_cache=False)
        return out.last_hidden_state

    @property
    def head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> targets [B, L] with target[i] = labels[i + 1] and IGNORE_INDEX at the end."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def count_targets(labels: torch.Tensor) -> tuple[int, int]:
    """(noisy, clean) target counts of a micro-batch; sum them over the global batch for the normaliser."""
    clean = shift_targets(labels)
    noisy = torch.where(labels != IGNORE_INDEX, clean, torch.full_like(clean, IGNORE_INDEX))
    return int((noisy != IGNORE_INDEX).sum()), int((clean != IGNORE_INDEX).sum())


def global_target_counts(micro_batch_labels: Sequence[torch.Tensor], group=None) -> tuple[int, int]:
    """Normalisers for one optimizer step: (noisy, clean) target counts summed over this rank's micro-batches
    and, when torch.distributed is initialised, all-reduced across the data-parallel ranks.

    Each rank then calls `idlm_loss(..., num_noisy=, num_clean=)` per micro-batch and sums gradients; the
    result is the gradient of the global-batch mean. Under DDP, which *averages* gradients over ranks,
    multiply each rank's loss by the world size.
    """
    counts = torch.tensor([0, 0], dtype=torch.long)
    for labels in micro_batch_labels:
        counts += torch.tensor(count_targets(labels))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend_device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
        counts = counts.to(backend_device)
        torch.distributed.all_reduce(counts, group=group)
    return int(counts[0]), int(counts[1])


def noisy_rows(layout: SequenceLayout, supervised: torch.Tensor, compact: bool = True) -> torch.Tensor:
    """Which x_t rows to build: [B, K] original positions, -1 for padding.

    compact=True keeps only rows whose mask block holds a supervised position (the other x_t rows are
    unsupervised and invisible to supervised rows, so they cannot change the loss); False keeps all L.
    """
    B, L = supervised.shape
    if not compact:
        return torch.arange(L, device=supervised.device).expand(B, L).clone()
    blk = layout.block_ids.clamp(0, L)
    has_sup = torch.zeros(B, L + 1, dtype=torch.long, device=supervised.device)
    has_sup.scatter_reduce_(1, blk, supervised.long(), reduce="amax")
    keep = has_sup.gather(1, blk).bool() & layout.valid
    counts = keep.sum(1, keepdim=True)
    K = int(counts.max()) if B else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]  # kept positions first, in order
    return torch.where(torch.arange(K, device=supervised.device) < counts, order, -1)


def build_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_token_id: int,
    block_size: int,
    attention_mask: torch.Tensor | None = None,
    block_align: str = "response",
    compact: bool = True,
) -> IDLMInputs:
    """Build [x_t | x_0], positions and targets from clean ids [B, L], labels [B, L] and padding mask [B, L].

    compact: drop the x_t rows that cannot affect the loss (see `noisy_rows`); exact, and cheaper.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    supervised = (labels != IGNORE_INDEX) & valid
    positions = positions_from_mask(valid)
    layout = SequenceLayout(
        positions=positions,
        block_ids=compute_block_ids(supervised, positions, block_size, block_align),
        valid=valid,
    )
    clean_targets = shift_targets(torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX)))
    index = noisy_rows(layout, supervised, compact)
    is_row = index >= 0
    src = index.clamp(min=0)
    masked = supervised.gather(1, src) & is_row
    x_t = torch.where(masked, mask_token_id, input_ids.gather(1, src))
    noisy_targets = torch.where(masked, clean_targets.gather(1, src), IGNORE_INDEX)
    pos_t = torch.where(is_row, positions.gather(1, src), 0)
    return IDLMInputs(
        input_ids=torch.cat([x_t, input_ids], dim=1),
        position_ids=torch.cat([pos_t, positions], dim=1),
        noisy_index=index,
        noisy_targets=noisy_targets,
        clean_targets=clean_targets,
        layout=layout,
    )


def attention_mask_for(model: torch.nn.Module, inputs: IDLMInputs, dtype: torch.dtype | None = None):
    """The rule in the form the model's attention implementation takes (bool, additive or BlockMask)."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl == "flex_attention":
        return flex_block_mask(inputs.layout, inputs.noisy_index)
    mask = dense_mask(inputs.layout, inputs.noisy_index)
    if impl == "sdpa":
        return mask
    return additive_mask(mask, dtype or next(model.parameters()).dtype)


def idlm_hidden_states(model: torch.nn.Module, inputs: IDLMInputs) -> torch.Tensor:
    """Final-norm hidden states [B, K + L, d] of an HF causal LM on [x_t rows | x_0] under the I-DLM rule."""
    decoder = model.get_decoder()
    mask = attention_mask_for(model, inputs)
    out = decoder(input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state


def clean_weight(cfg: ObjectiveConfig, ce_noisy: torch.Tensor, ce_clean: torch.Tensor) -> torch.Tensor:
    """w of CE_clean: alpha, or alpha * CE_noisy / CE_clean (detached) with auto-balance (0 when CE_clean is 0)."""
    alpha = torch.tensor(cfg.alpha, dtype=ce_noisy.dtype, device=ce_noisy.device)
    if not cfg.auto_balance:
        return alpha
    n, c = ce_noisy.detach(), ce_clean.detach()
    return torch.where(c > 0, alpha * n / c.clamp(min=torch.finfo(c.dtype).tiny), torch.zeros_like(c))


def idlm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    cfg: IDLMConfig,
    attention_mask: torch.Tensor | None = None,
    num_noisy: int | None = None,
    num_clean: int | None = None,
    weight: torch.Tensor | float | None = None,
    chunk_size: int = 2048,
    compact: bool = True,
    teacher: Teacher | None = None,
) -> LossOutput:
    """CE_noisy + w * CE_clean for one micro-batch of an HF causal LM.

    input_ids, labels, attention_mask: [B, L] (labels -100 on prompt and padding).
    num_noisy / num_clean: normalisers, i.e. the target counts of the *global* batch (see `count_targets`);
        default: this micro-batch's own counts (at least 1, so a batch without targets gives 0, not NaN).
    weight: w; default from ``cfg.objective`` (fixed alpha, or auto-balance on this micro-batch's CE ratio).
        A trainer that accumulates should pass one weight for the whole optimizer step.
    teacher: the frozen model whose distribution ``distill_kl`` / ``distill_soft`` train towards (`Teacher`).
    """
    inputs = build_inputs(
        input_ids, labels, cfg.mask_token_id, cfg.block_size, attention_mask, cfg.objective.block_align, compact
    )
    obj = cfg.objective
    if obj.uses_teacher and teacher is None:
        raise ValueError("the objective has distill_kl / distill_soft / distill_accept set but no teacher was given")
    hidden = idlm_hidden_states(model, inputs)
    K = inputs.num_noisy_rows
    d = hidden.shape[-1]
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    h_noisy, h_clean = hidden[:, :K].reshape(-1, d), hidden[:, K:].reshape(-1, d)
    t_noisy = inputs.noisy_targets.reshape(-1)
    t_clean = inputs.clean_targets.reshape(-1)
    norm_noisy = max(num_noisy if num_noisy is not None else int((t_noisy != IGNORE_INDEX).sum()), 1)
    norm_clean = max(num_clean if num_clean is not None else int((t_clean != IGNORE_INDEX).sum()), 1)
    zero = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    kl_noisy = kl_clean = zero
    th_noisy = th_clean = None
    if teacher is not None and obj.uses_teacher:
        th = teacher.hidden_states(inputs)  # [B, L, d_t]
        dt = th.shape[-1]
        th_clean = th.reshape(-1, dt)
        idx = inputs.noisy_index.clamp(min=0)[..., None].expand(-1, -1, dt)
        th_noisy = th.gather(1, idx).reshape(-1, dt)
        t_head = teacher.head
        t_w, t_b = t_head.weight, getattr(t_head, "bias", None)

    gap_noisy = zero
    if th_noisy is not None and (obj.distill_soft > 0 or obj.distill_accept > 0):
        m = linear_mixed_cross_entropy_sum(h_noisy, head.weight, t_noisy, th_noisy, t_w, obj.distill_soft, bias, t_b,
                                           chunk_size, accept=obj.distill_accept)
        sum_noisy, n_noisy, kl_noisy, gap_noisy = m.hard, m.count, m.soft - m.entropy, m.gap
        noisy_term = (m.mixed - obj.distill_soft * m.entropy) / norm_noisy  # (1 - s) CE + s KL + a gap
    else:
        sum_noisy, n_noisy = linear_cross_entropy_sum(h_noisy, head.weight, t_noisy, bias, chunk_size)
        noisy_term = sum_noisy / norm_noisy
    ce_noisy = sum_noisy.detach() / norm_noisy

    if weight is None and obj.distill_kl > 0:
        weight = obj.alpha  # auto_balance is excluded with distill_kl (ObjectiveConfig)
    if th_clean is not None and obj.distill_kl > 0:
        w = torch.as_tensor(weight, dtype=zero.dtype, device=hidden.device).detach()
        scale = float(w) + obj.distill_kl
        m = linear_mixed_cross_entropy_sum(h_clean, head.weight, t_clean, th_clean, t_w, obj.distill_kl / scale,
                                           bias, t_b, chunk_size)
        sum_clean, n_clean, kl_clean = m.hard, m.count, m.soft - m.entropy
        clean_term = (scale * m.mixed - obj.distill_kl * m.entropy) / norm_clean  # = (w CE + k KL) / norm
        ce_clean = sum_clean.detach() / norm_clean
    else:
        sum_clean, n_clean = linear_cross_entropy_sum(h_clean, head.weight, t_clean, bias, chunk_size)
        ce_clean_graph = sum_clean / norm_clean
        ce_clean = ce_clean_graph.detach()
        if weight is None:
            w = clean_weight(obj, ce_noisy, ce_clean)
        else:
            w = torch.as_tensor(weight, dtype=ce_clean.dtype, device=hidden.device).detach()
        clean_term = w * ce_clean_graph
    loss = noisy_term + clean_term
    return LossOutput(
        loss=loss,
        ce_noisy=ce_noisy,
        ce_clean=ce_clean,
        weight=w,
        sum_noisy=sum_noisy.detach(),
        sum_clean=sum_clean.detach(),
        n_noisy=n_noisy,
        n_clean=n_clean,
        sum_kl_noisy=kl_noisy.detach(),
        sum_kl_clean=kl_clean.detach(),
        sum_gap_noisy=gap_noisy.detach(),
    )
