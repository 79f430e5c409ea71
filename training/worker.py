"""One stage of a training plan on one rank: ``python -m idlm.training.worker PLAN.json --stage K [--resume CKPT]``.

`idlm train` (idlm.training.launch) starts this under torchrun or the DeepSpeed launcher. It uses LlamaFactory's
public pieces: the argument parser (``get_train_args``), tokenizer/template/dataset pipeline (``load_tokenizer``,
``get_template_and_fix_tokenizer``, ``get_dataset``) and model loader (``load_model``, LoRA included), then trains
with `IDLMTrainer` and writes a loadable I-DLM checkpoint (or a gated-LoRA adapter) into the stage directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from idlm.config import IDLMConfig, read_idlm_config, write_idlm_config
from idlm.errors import UserError
from idlm.lora import GatedLoRAConfig, attach_gate, free_mask_row, mask_row_of_token
from idlm.objective import Teacher
from idlm.training.compile import compile_layers
from idlm.training.curriculum import mark_stage_done
from idlm.training.ds_patch import skip_cpu_shm_comm_build
from idlm.training.flops import device_peak_tflops
from idlm.training.recipe import Plan

# Imported inside run_stage, for the stage's trainer only: LlamaFactory (and idlm.training.trainer, which builds on
# its SFT trainer) for trainer=llamafactory, idlm.training.loop for trainer=idlm, so that a stage of one kind never
# loads the other's stack.

EXIT_USAGE = 2


def _die_with_parent() -> None:
    """Ask Linux to kill this rank when its launcher dies (a killed run leaves no orphan holding devices)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
    except OSError:
        pass


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_stage(plan_path: str, index: int, resume: str | None) -> None:
    plan = Plan.from_json(Path(plan_path).read_text())
    stage = plan.stages[index - 1]
    s = stage.settings
    if s.trainer == "idlm":
        from idlm.training.loop import run_loop_stage

        run_loop_stage(plan, stage)
        return
    lf_args = dict(stage.lf_args)
    if resume:
        lf_args["resume_from_checkpoint"] = resume

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    try:
        model_args, data_args, training_args, finetuning_args, _ = get_train_args(lf_args)
    except ValueError as exc:  # LlamaFactory's argument checks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"stage {index}: {first}") from exc
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)
    if "train_dataset" not in dataset_module or len(dataset_module["train_dataset"]) == 0:
        raise UserError(f"stage {index}: no training rows after LlamaFactory's preprocessing")
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=True)

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if s.attn_implementation:
        inner.set_attn_implementation(s.attn_implementation)
    impl = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager", "flex_attention"):
        raise UserError(f"attention implementation {impl!r} cannot take the I-DLM mask; use attn_implementation: "
                        "flex_attention (GPU) or sdpa")
    idlm_cfg, gated_meta = _stage_config(inner, tokenizer, s)
    if s.finetuning == "gated_lora":
        attach_gate(inner, idlm_cfg.mask_token_id)  # LoRA only on MASK rows, exactly as at inference
    else:
        write_idlm_config(inner.config, idlm_cfg)  # every checkpoint of this stage carries its stride
        inner.config.mask_token_id = idlm_cfg.mask_token_id

    from idlm.training.trainer import (
        CheckpointCommit,
        IDLMCollator,
        IDLMTrainer,
        JsonlLog,
        install_objective_forward,
        register_zero3_head,
    )

    if s.compile_layers:
        compile_layers(inner)  # regional: the mask and the chunked loss stay eager
    teacher = None
    if idlm_cfg.objective.uses_teacher:
        t_dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
        teacher = Teacher.load(s.teacher, t_dtype, training_args.device)
        t_rows = teacher.head.weight.shape[0]
        if t_rows != inner.get_output_embeddings().weight.shape[0]:
            raise UserError(f"stage {index}: the teacher {s.teacher} has {t_rows} vocabulary rows, the model "
                            f"{inner.get_output_embeddings().weight.shape[0]}: use the model before conversion's "
                            "I-DLM checkpoint (the default) as teacher")
    install_objective_forward(inner, idlm_cfg, teacher=teacher)
    register_zero3_head(model, inner)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    commit = CheckpointCommit()
    training_args.prediction_loss_only = True  # evaluation reports the objective's loss (no logits are computed)
    peak = s.peak_tflops
    if peak is None:
        dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
        peak = device_peak_tflops(training_args.device, dtype)
    trainer = IDLMTrainer(
        model=model,
        args=training_args,
        finetuning_args=finetuning_args,
        processor=tokenizer_module.get("processor"),
        tokenizer=tokenizer,
        data_collator=IDLMCollator(pad, pad_to_multiple_of=8),
        callbacks=[commit, JsonlLog(plan.log_file, index, s.stride)],
        train_dataset=dataset_module["train_dataset"],
        eval_dataset=dataset_module.get("eval_dataset"),
        idlm_cfg=idlm_cfg,
        objective_model=inner,
        clean_weight=0.0 if s.finetuning == "gated_lora" else None,
        peak_tflops=peak,
    )
    commit.trainer = trainer
    if training_args.resume_from_checkpoint:
        trainer.load_idlm_state(training_args.resume_from_checkpoint)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    _barrier()
    if _is_rank0():
        out = Path(s.output_dir)
        if gated_meta is not None:
            gated_meta.save(out)
        mark_stage_done(out, {"stage": index, "stride": s.stride, "finetuning": s.finetuning, "trainer": s.trainer,
                              "global_step": trainer.state.global_step, "idlm": idlm_cfg.to_dict(),
                              "metrics": result.metrics})
    _barrier()


def _stage_config(model, tokenizer, s):
    """(IDLMConfig of this stage, GatedLoRAConfig or None)."""
    objective = s.objective()
    rows = model.get_input_embeddings().weight.shape[0]
    if s.finetuning == "gated_lora":
        mask_id = s.mask_token_id if s.mask_token_id is not None else free_mask_row(tokenizer, rows)
        if s.mask_token is not None:
            mask_id = mask_row_of_token(tokenizer, s.mask_token)
        if mask_id is None or not 0 <= mask_id < rows:
            raise UserError(f"gated LoRA needs a MASK embedding row: the base model has {rows} rows and its tokenizer "
                            "uses them all; set mask_token_id to a rarely used token id")
        base = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        return (IDLMConfig(mask_token_id=mask_id, stride=s.stride, objective=objective),
                GatedLoRAConfig(mask_token_id=mask_id, stride=s.stride, base_model=base))
    found = read_idlm_config(model.config)
    if found is None and s.mask_token_id is None:
        raise UserError(f"{getattr(model.config, '_name_or_path', 'the model')} is not an I-DLM checkpoint (no 'idlm' "
                        "block in config.json): convert it first with `idlm convert`")
    mask_id = s.mask_token_id if s.mask_token_id is not None else found.mask_token_id
    return IDLMConfig(mask_token_id=mask_id, stride=s.stride, objective=objective), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idlm.training.worker")
    parser.add_argument("plan")
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None)  # the DeepSpeed launcher adds it
    args = parser.parse_args(argv)
    _die_with_parent()
    skip_cpu_shm_comm_build()
    try:
        run_stage(args.plan, args.stage, args.resume)
    except UserError as exc:
        print(f"idlm train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _shutdown()
    return 0


def _shutdown() -> None:
    """Leave without the interpreter's teardown: after the stage is written, background threads of the process
    group (gloo, ZeRO-3) can abort ("terminate called without an active exception") while Python exits."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort, the work is saved
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
