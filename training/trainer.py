"""The LlamaFactory extension: a trainer and a collator that run the [x_t | x_0] objective.

How the pieces fit (transformers 5.6 / LlamaFactory 0.9.5, pinned):

* `install_objective_forward` gives the HF causal LM an instance-level ``forward`` that, when called with the
  ``idlm_*`` keyword arguments, runs `idlm.objective.idlm_loss` and returns its parts. The trainer calls the
  *wrapped* model (DDP or DeepSpeed engine) with those arguments, so the wrapper's forward/backward machinery
  (gradient reduction, ZeRO hooks) sees an ordinary forward. Without them the original forward runs.
* `IDLMTrainer.get_batch_samples` (the Trainer's hook that fetches one optimizer step's micro-batches) computes
  the step's target counts with `idlm.objective.global_target_counts` (summed over the micro-batches, all-reduced
  across ranks). Every micro-batch's loss is divided by those global counts and multiplied by the data-parallel
  world size (DDP and DeepSpeed *average* gradients over ranks), so the accumulated gradient is the gradient of the
  global-batch mean however the batch is split. The Trainer is told the loss is already normalised
  (``model_accepts_loss_kwargs`` with a non-None ``num_items_in_batch``), so it neither divides by the accumulation
  steps nor lets DeepSpeed do so.
* Clean-loss weight: one per optimizer step. Fixed: alpha. Auto-balance: ``alpha * CE_noisy / CE_clean`` of the
  *previous* optimizer step's global batch (the first step of a stage measures its own global batch with one extra
  no-grad forward), so all ranks and all micro-batches use one value, independent of how the batch is split. It is
  stored in each checkpoint, so a resumed run continues identically.
* Per optimizer step the summed CE and the work (tokens, FLOPs) are all-reduced once; ``log`` adds CE_noisy,
  CE_clean, weight, tokens/s and MFU to the Trainer's logs (so wandb, tensorboard and the JSONL file get them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import ModelOutput

from idlm.config import IDLMConfig
from idlm.losses import IGNORE_INDEX
from idlm.objective import Teacher, count_targets, global_target_counts, idlm_loss
from idlm.training.flops import ModelShape, StepWork, mfu, objective_work
from idlm.training.resume import COMMIT_FILE

try:  # the extension point is LlamaFactory's SFT trainer; plain HF Seq2SeqTrainer where it is not installed
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer as _BaseTrainer

    _LF = True
except ImportError:  # pragma: no cover - exercised only without the train extra
    from transformers import Seq2SeqTrainer as _BaseTrainer

    _LF = False


# ---------------------------------------------------------------------------------------------------------------
# The model side


@dataclass
class IDLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    ce_noisy: torch.Tensor | None = None
    ce_clean: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    sum_noisy: torch.Tensor | None = None
    sum_clean: torch.Tensor | None = None
    sum_kl_noisy: torch.Tensor | None = None
    sum_kl_clean: torch.Tensor | None = None
    sum_gap_noisy: torch.Tensor | None = None


def install_objective_forward(model: torch.nn.Module, cfg: IDLMConfig, teacher: Teacher | None = None) -> None:
    """Make ``model(input_ids=, labels=, attention_mask=, idlm_num_noisy=, idlm_num_clean=, idlm_weight=)`` compute
    the objective (an `IDLMOutput`); any call without ``idlm_num_noisy`` runs the model's own forward. ``teacher``
    (held in the closure, so it is no submodule that DDP/DeepSpeed would wrap) feeds the distillation terms."""
    original = model.forward
    model._idlm_original_forward = original
    model._idlm_cfg = cfg

    def forward(input_ids=None, attention_mask=None, labels=None, idlm_num_noisy=None, idlm_num_clean=None,
                idlm_weight=None, **kwargs):
        if idlm_num_noisy is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        out = idlm_loss(model, input_ids, labels, model._idlm_cfg, attention_mask, num_noisy=int(idlm_num_noisy),
                        num_clean=int(idlm_num_clean), weight=idlm_weight, teacher=teacher)
        return IDLMOutput(loss=out.loss, ce_noisy=out.ce_noisy, ce_clean=out.ce_clean, weight=out.weight,
                          sum_noisy=out.sum_noisy, sum_clean=out.sum_clean, sum_kl_noisy=out.sum_kl_noisy,
                          sum_kl_clean=out.sum_kl_clean, sum_gap_noisy=out.sum_gap_noisy)

    model.forward = forward


def register_zero3_head(wrapper: torch.nn.Module, inner: torch.nn.Module) -> None:
    """Under ZeRO-3 the LM-head weight is used outside its module (chunked CE): let DeepSpeed gather it with the
    outer module's forward and backward."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.runtime.zero import register_external_parameter

    register_external_parameter(wrapper, inner.get_output_embeddings().weight)


# ---------------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class IDLMCollator:
    """Right-pads input_ids (pad id), labels (-100) and attention_mask (0) to a multiple of ``pad_to_multiple_of``;
    other columns of LlamaFactory's rows (images, videos, audios) are dropped."""

    pad_token_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        L = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of > 1:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(features)
        batch = {
            "input_ids": torch.full((B, L), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((B, L), dtype=torch.long),
            "labels": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),
        }
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask = f.get("attention_mask")
            batch["attention_mask"][i, :n] = torch.as_tensor(mask, dtype=torch.long) if mask is not None else 1
            batch["labels"][i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------------------------------------------
# Trainer


@dataclass
class _StepState:
    n_noisy: int
    n_clean: int
    num_micro: int
    weight: torch.Tensor | float | None
    work: StepWork
    done: int = 0
    sum_noisy: torch.Tensor | float = 0.0
    sum_clean: torch.Tensor | float = 0.0
    sum_kl_noisy: torch.Tensor | float = 0.0
    sum_kl_clean: torch.Tensor | float = 0.0
    sum_gap_noisy: torch.Tensor | float = 0.0


@dataclass
class _Window:
    steps: int = 0
    ce_noisy: float = 0.0
    ce_clean: float = 0.0
    kl_noisy: float = 0.0
    kl_clean: float = 0.0
    gap_noisy: float = 0.0
    weight: float = 0.0
    work: StepWork = field(default_factory=StepWork)
    t0: float = field(default_factory=time.perf_counter)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over the data-parallel ranks (a no-op without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        out = t.to(dev)
        torch.distributed.all_reduce(out)
        return out.cpu()
    return t


class IDLMTrainer(_BaseTrainer):
    """LlamaFactory's SFT trainer with the I-DLM objective (see the module doc).

    idlm_cfg: mask id, stride and loss settings of this stage.
    objective_model: the HF causal LM that `install_objective_forward` was applied to (the PEFT base for LoRA).
    clean_weight: force the clean-loss weight (0 for gated-LoRA training: noisy-half loss only).
    peak_tflops: per-device peak for MFU (None: no MFU in the logs).
    """

    def __init__(self, *args, idlm_cfg: IDLMConfig, objective_model: torch.nn.Module,
                 clean_weight: float | None = None, peak_tflops: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Our compute_loss already normalises by the global target count: stop the Trainer from dividing by the
        # accumulation steps (and DeepSpeed from scaling by them).
        self.model_accepts_loss_kwargs = True
        self.idlm_cfg = idlm_cfg
        self.clean_weight = clean_weight
        self.peak_tflops = peak_tflops
        self.shape = ModelShape.of(objective_model)
        self.prev_ratio: tuple[float, float] | None = None  # (CE_noisy, CE_clean) of the previous optimizer step
        self._step: _StepState | None = None
        self._window = _Window()

    # -- one optimizer step's micro-batches -------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        n_noisy, n_clean = global_target_counts([b["labels"] for b in batch_samples])
        work = StepWork()
        for b in batch_samples:
            work += objective_work(b["input_ids"], b["labels"], b.get("attention_mask"), self.idlm_cfg)
        weight = self._step_weight()
        if weight is None:  # auto-balance, first step of the stage: measure this step's global CE ratio first
            weight = self._measure_weight(batch_samples, n_noisy, n_clean)
        self._step = _StepState(n_noisy, n_clean, len(batch_samples), weight, work)
        # A non-None count tells the Trainer that the loss is normalised already (no division by accumulation).
        return batch_samples, torch.tensor(n_clean, device=device)

    def _step_weight(self) -> float | None:
        obj = self.idlm_cfg.objective
        if self.clean_weight is not None:
            return float(self.clean_weight)
        if not obj.auto_balance:
            return float(obj.alpha)
        if self.prev_ratio is None:
            return None  # first step of the stage: see _measure_weight
        noisy, clean = self.prev_ratio
        return obj.alpha * noisy / clean if clean > 0 else 0.0

    @torch.no_grad()
    def _measure_weight(self, batch_samples, n_noisy: int, n_clean: int) -> float:
        """alpha * CE_noisy / CE_clean of this step's global batch, from a no-grad forward of its micro-batches
        (once per stage: later steps use the previous step's ratio, which costs nothing)."""
        model = self.model_wrapped
        sums = torch.zeros(2, dtype=torch.float64)
        for b in batch_samples:
            b = self._prepare_inputs(b)
            out = self._forward(model, b, _StepState(n_noisy, n_clean, 1, 0.0, StepWork()))
            sums += torch.stack([out.sum_noisy.double().cpu(), out.sum_clean.double().cpu()])
        sums = _all_reduce_sum(sums)
        noisy, clean = float(sums[0]) / max(n_noisy, 1), float(sums[1]) / max(n_clean, 1)
        return self.idlm_cfg.objective.alpha * noisy / clean if clean > 0 else 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        st = self._step
        if st is None or not model.training:  # evaluation: this batch's own counts
            n_noisy, n_clean = count_targets(inputs["labels"])
            st_eval = _StepState(n_noisy, n_clean, 1, self._step_weight(), StepWork())
            out = self._forward(model, inputs, st_eval)
            return (out.loss, out) if return_outputs else out.loss
        out = self._forward(model, inputs, st)
        st.sum_noisy = st.sum_noisy + out.sum_noisy.detach().double()  # stays on the device: no sync here
        st.sum_clean = st.sum_clean + out.sum_clean.detach().double()
        st.sum_kl_noisy = st.sum_kl_noisy + out.sum_kl_noisy.detach().double()
        st.sum_kl_clean = st.sum_kl_clean + out.sum_kl_clean.detach().double()
        st.sum_gap_noisy = st.sum_gap_noisy + out.sum_gap_noisy.detach().double()
        st.done += 1
        if st.done == st.num_micro:
            self._finish_step(st)
        loss = out.loss
        world = self.accelerator.num_processes
        if world > 1:
            loss = loss * world  # DDP / DeepSpeed average gradients over ranks; the normaliser is global already
        return (loss, out) if return_outputs else loss

    def _forward(self, model, inputs, st: _StepState) -> IDLMOutput:
        return model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            labels=inputs["labels"],
            idlm_num_noisy=st.n_noisy,
            idlm_num_clean=st.n_clean,
            idlm_weight=st.weight,
        )

    def _finish_step(self, st: _StepState) -> None:
        sums = torch.stack([torch.as_tensor(x, dtype=torch.float64).cpu()
                            for x in (st.sum_noisy, st.sum_clean, st.sum_kl_noisy, st.sum_kl_clean,
                                      st.sum_gap_noisy)])
        stats = _all_reduce_sum(torch.cat([sums, st.work.as_tensor()]))
        ce_noisy = float(stats[0]) / max(st.n_noisy, 1)
        ce_clean = float(stats[1]) / max(st.n_clean, 1)
        self.prev_ratio = (ce_noisy, ce_clean)
        w = self._window
        w.steps += 1
        w.ce_noisy += ce_noisy
        w.ce_clean += ce_clean
        w.kl_noisy += float(stats[2]) / max(st.n_noisy, 1)
        w.kl_clean += float(stats[3]) / max(st.n_clean, 1)
        w.gap_noisy += float(stats[4]) / max(st.n_noisy, 1)
        w.weight += float(st.weight)
        w.work += StepWork.from_tensor(stats[5:])
        self._step = None

    # -- logging -------------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        w = self._window
        if "loss" in logs and w.steps > 0:
            dt = time.perf_counter() - w.t0
            flops = w.work.flops(self.shape)
            logs.update({
                "ce_noisy": w.ce_noisy / w.steps,
                "ce_clean": w.ce_clean / w.steps,
                "clean_weight": w.weight / w.steps,
                **({"kl_noisy": w.kl_noisy / w.steps, "kl_clean": w.kl_clean / w.steps,
                    "accept_gap_noisy": w.gap_noisy / w.steps}
                   if self.idlm_cfg.objective.uses_teacher else {}),
                "stride": self.idlm_cfg.stride,
                "tokens_per_s": w.work.tokens / dt,
                "model_tokens_per_s": w.work.model_tokens / dt,
                "tflops_per_device": flops / dt / self.accelerator.num_processes / 1e12,
            })
            m = mfu(flops, dt, self.accelerator.num_processes, self.peak_tflops)
            if m is not None:
                logs["mfu"] = m
            self._window = _Window()
        super().log(logs, start_time)

    # -- checkpoint state ----------------------------------------------------------------------------------------

    def idlm_state(self) -> dict[str, Any]:
        return {"prev_ratio": self.prev_ratio}

    def load_idlm_state(self, checkpoint_dir: str) -> None:
        path = Path(checkpoint_dir) / COMMIT_FILE
        if path.is_file():
            prev = json.loads(path.read_text()).get("state", {}).get("prev_ratio")
            self.prev_ratio = tuple(prev) if prev is not None else None


# ---------------------------------------------------------------------------------------------------------------
# Callbacks


class CheckpointCommit(TrainerCallback):
    """After every rank has written its part of ``checkpoint-N``, rank 0 writes ``idlm_commit.json`` (with the
    trainer's I-DLM state). A checkpoint without it is incomplete (the run was killed while saving) and is not
    resumed from."""

    def __init__(self) -> None:
        self.trainer: IDLMTrainer | None = None

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            body = {"step": state.global_step, "state": self.trainer.idlm_state() if self.trainer else {}}
            tmp = ckpt / f".{COMMIT_FILE}.tmp"
            tmp.write_text(json.dumps(body) + "\n")
            tmp.replace(ckpt / COMMIT_FILE)
        return control


class JsonlLog(TrainerCallback):
    """Rank 0 appends every log row (loss components, lr, tokens/s, MFU, ...) to a JSONL file, with the stage."""

    def __init__(self, path: str, stage: int, stride: int) -> None:
        self.path = Path(path)
        self.stage = stage
        self.stride = stride

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return control
        row = {"stage": self.stage, "stride": self.stride, "step": state.global_step, "epoch": state.epoch,
               "time": time.time(), **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        return control
