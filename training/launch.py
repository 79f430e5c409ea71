"""`idlm train RECIPE.yaml [key=value ...]`: run every stage of a recipe, resuming where a killed run stopped.

For each stage in order: a stage whose directory holds ``idlm_stage.json`` is finished and skipped; otherwise the
stage starts (or resumes from its newest *committed* HF checkpoint, see `idlm.training.trainer.CheckpointCommit`)
in fresh processes: ``python -m idlm.training.worker`` on one process, or under torchrun / the DeepSpeed launcher
over NPROC_PER_NODE x NNODES ranks. Running the same command again after a kill therefore skips the finished
stages, resumes the current one at its last checkpoint (same step, same data order) and ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from idlm.errors import UserError
from idlm.training.datacheck import check_plan_data
from idlm.training.recipe import PLAN_FILE, Plan, Stage, resolve_recipe, stage_done
from idlm.training.resume import CKPT_RE, committed_checkpoint, truncate_log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_command(plan: Plan, plan_file: str, stage: Stage, resume: str | None) -> list[str]:
    worker = ["--stage", str(stage.settings.index)] + (["--resume", resume] if resume else [])
    L = plan.launch
    if L.launcher == "none":
        return [sys.executable, "-m", "idlm.training.worker", plan_file, *worker]
    port = str(L.master_port or _free_port())
    if L.launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", str(L.nnodes),
               "--num_gpus", str(L.nproc_per_node), "--master_addr", L.master_addr, "--master_port", port]
        if L.hostfile:
            cmd += ["--hostfile", L.hostfile]
        return cmd + ["--module", "idlm.training.worker", plan_file, *worker]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(L.nnodes), "--node_rank",
            str(L.node_rank), "--nproc_per_node", str(L.nproc_per_node), "--master_addr", L.master_addr,
            "--master_port", port, "-m", "idlm.training.worker", plan_file, *worker]


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _report_to(plan: Plan) -> set[str]:
    out: set[str] = set()
    for st in plan.stages:
        r = st.lf_args.get("report_to", "none")
        out.update([r] if isinstance(r, str) else list(r))
    return out


def worker_env(plan: Plan) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:  # pragma: no cover
        pass
    reporters = _report_to(plan)
    if "wandb" in reporters or "all" in reporters:
        if not env.get("WANDB_MODE") and not _wandb_logged_in():
            env["WANDB_MODE"] = "offline"  # logs stay under OUTPUT_DIR/wandb; `wandb sync` uploads them later
        env.setdefault("WANDB_PROJECT", "idlm")
        env.setdefault("WANDB_DIR", plan.output_dir)
    return env


def _preexec():  # the launcher dies with `idlm train` (a SIGKILL of it leaves no orphan)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _check_base(plan: Plan) -> None:
    """A full-finetuning run must start from an I-DLM checkpoint (local directories only; hub ids are checked by
    the worker)."""
    first = plan.stages[0]
    if first.settings.finetuning != "full" or stage_done(first) or first.settings.mask_token_id is not None:
        return
    model = Path(first.lf_args["model_name_or_path"])
    cfg = model / "config.json"
    if model.is_dir():
        if not cfg.is_file():
            raise UserError(f"not a model directory: {model} has no config.json")
        if "idlm" not in json.loads(cfg.read_text()):
            raise UserError(f"{model} is not an I-DLM checkpoint (no 'idlm' block in config.json): convert it first "
                            f"with `idlm convert --base {model} --output DIR`")


def _check_installed(plan: Plan) -> None:
    import importlib.util

    if all(st.settings.trainer == "idlm" for st in plan.stages):
        return
    need = ["llamafactory"]
    if plan.launch.launcher == "deepspeed" or any(st.lf_args.get("deepspeed") for st in plan.stages):
        need.append("deepspeed")
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed: install the training extra, "
                        "pip install 'idlm[train]' (docs/training.md)")


PHASES = ("prepare", "generate", "train", "evaluate")


def run_recipe(recipe: str, overrides: list[str] | None = None, dry_run: bool = False, quiet: bool = False,
               phases: tuple[str, ...] = PHASES) -> int:
    """Run (or, with ``dry_run``, print) the plan of ``recipe``; returns the process exit code.

    phases: which of the pipeline's phases to run (`idlm.training.pipeline`): prepare (the base section),
    generate, train (the stages) and evaluate; each is skipped when its section is absent or its output exists."""
    from idlm.training import pipeline  # generation and evaluation (the engine): only recipes with sections use it

    bad = sorted(set(phases) - set(PHASES))
    if bad:
        raise UserError(f"unknown phase(s) {', '.join(bad)}: choose from {', '.join(PHASES)}")
    plan = resolve_recipe(recipe, overrides)
    if dry_run:
        print(plan.to_json())
        return 0
    lead = plan.launch.node_rank == 0
    if lead and "prepare" in phases and "base" in plan.sections:
        pipeline.run_prepare(plan.sections["base"])
    if lead and "generate" in phases and "generate" in plan.sections:
        pipeline.run_generate(plan.sections["generate"])
    if "train" in phases:
        rc = _run_stages(plan, quiet)
        if rc != 0:
            return rc
    if lead and "evaluate" in phases and "evaluate" in plan.sections:
        pipeline.run_evaluate(plan, plan.sections["evaluate"])
    return 0


def _run_stages(plan: Plan, quiet: bool) -> int:
    _check_base(plan)
    lead = plan.launch.node_rank == 0
    if lead:
        check_plan_data(plan)
    _check_installed(plan)
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every node writes its own copy (the other nodes must not wait for node 0's file)
    plan_file = str(out / (PLAN_FILE if lead else f"idlm_plan.node{plan.launch.node_rank}.json"))
    tmp = Path(f"{plan_file}.{os.getpid()}.tmp")
    tmp.write_text(plan.to_json() + "\n")
    tmp.replace(plan_file)
    env = worker_env(plan)
    say = (lambda msg: None) if quiet else (lambda msg: print(f"[idlm train] {msg}", file=sys.stderr, flush=True))
    for stage in plan.stages:
        s = stage.settings
        if stage_done(stage):
            say(f"stage {s.index} (stride {s.stride}) already finished: {s.output_dir}")
            continue
        resume = committed_checkpoint(s.output_dir, clean=lead)
        if resume and lead:
            truncate_log(plan.log_file, s.index, int(CKPT_RE.match(Path(resume).name).group(1)))
        say(f"stage {s.index} (stride {s.stride}) {'resuming from ' + resume if resume else 'starting'}"
            f" -> {s.output_dir}")
        cmd = stage_command(plan, plan_file, stage, resume)
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_preexec)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        if rc != 0 and stage_done(stage):
            say(f"stage {s.index} was written completely but a process exited with code {rc} afterwards; going on")
            rc = 0
        if rc != 0:
            if rc == 2 and plan.launch.launcher == "none":
                return 2  # the worker printed the one-line error
            print(f"idlm train: error: stage {s.index} (stride {s.stride}) failed with exit code {rc}; "
                  "rerun the same command to resume from its last checkpoint", file=sys.stderr)
            return rc if rc > 0 else 1
        if not stage_done(stage) and plan.launch.node_rank == 0:
            print(f"idlm train: error: stage {s.index} ended without writing {s.output_dir}", file=sys.stderr)
            return 1
    say(f"done: {plan.stages[-1].settings.output_dir}")
    return 0
