"""End to end through LlamaFactory and DeepSpeed on CPU: the tiny two-stage curriculum on 2 gloo ranks with ZeRO-2,
kill and resume, normalisation across ranks and accumulation, and gated-LoRA training for R-ISD.

Each run is `python -m idlm.cli train configs/train/tiny_cpu.yaml key=value ...` in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("llamafactory")
pytest.importorskip("deepspeed")

from safetensors.torch import load_file  # noqa: E402

from idlm.config import read_idlm_config  # noqa: E402
from idlm.training.recipe import STAGE_DONE_FILE  # noqa: E402
from idlm.training.tiny_assets import build_tiny_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/train/tiny_cpu.yaml")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu",
           "TRANSFORMERS_VERBOSITY": "warning", "DISABLE_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))


def _train(overrides: list[str], log: Path, env_extra: dict | None = None, popen: bool = False):
    cmd = [sys.executable, "-m", "idlm.cli", "train", TINY, *overrides]
    env = {**os.environ, **OFFLINE, **(env_extra or {})}
    with log.open("a") as fh:
        if popen:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-4000:]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _workers_of(path: str) -> list[int]:
    """Pids of live processes whose command line mentions ``path`` (read from /proc; nothing is signalled)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if path in (p / "cmdline").read_bytes().decode(errors="replace") and int(p.name) != os.getpid():
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def test_curriculum_zero2_two_ranks_then_kill_and_resume(assets, tmp_path):
    """Two stages (N=2 -> N=3, auto-balance in the second) on 2 ranks with DeepSpeed ZeRO-2; the loss falls; each
    stage directory is a loadable I-DLM checkpoint. A run SIGKILLed mid-stage after a checkpoint and started
    again with the same command skips the finished stage, resumes the current one and ends with the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    t0 = time.perf_counter()
    _train([f"model_name_or_path={assets['idlm_base']}", f"output_dir={run_a}"], tmp_path / "a.log")
    t_full = time.perf_counter() - t0
    assert t_full < 180, f"two-stage run took {t_full:.0f} s"

    rows = [json.loads(line) for line in (run_a / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [(r["stage"], r["step"]) for r in steps] == [(1, i) for i in range(1, 9)] + [(2, i) for i in range(1, 9)]
    for r in steps:
        assert {"ce_noisy", "ce_clean", "clean_weight", "learning_rate", "tokens_per_s", "tflops_per_device"} <= set(r)
        assert r["loss"] == pytest.approx(r["ce_noisy"] + r["clean_weight"] * r["ce_clean"], rel=1e-4)
    s1 = [r for r in steps if r["stage"] == 1]
    s2 = [r for r in steps if r["stage"] == 2]
    assert s1[-1]["loss"] < s1[0]["loss"] - 1.0
    assert s2[-1]["ce_noisy"] < s2[0]["ce_noisy"]
    assert all(r["clean_weight"] == pytest.approx(0.2) for r in s1)
    assert all(r["clean_weight"] != pytest.approx(1.0, abs=1e-9) for r in s2)  # auto-balanced, alpha 1
    for stage, stride in [(1, 2), (2, 3)]:
        d = run_a / f"stage{stage}-n{stride}"
        assert (d / STAGE_DONE_FILE).is_file()
        cfg = json.loads((d / "config.json").read_text())
        block = read_idlm_config(cfg)
        assert block.stride == stride and block.objective.auto_balance == (stage == 2)
        model = AutoModelForCausalLM.from_pretrained(d)  # stock transformers, no remote code
        tok = AutoTokenizer.from_pretrained(d)
        assert model.config.idlm["stride"] == stride and tok("What is 1 plus 2?").input_ids
    assert list((run_a / "stage1-n2" / "runs").iterdir())  # tensorboard events

    # Run B: the finished first stage is reused; the second is killed right after its step-4 checkpoint.
    run_b.mkdir()
    shutil.copytree(run_a / "stage1-n2", run_b / "stage1-n2")
    args_b = [f"model_name_or_path={assets['idlm_base']}", f"output_dir={run_b}"]
    hold = {"IDLM_TEST_HOLD_AT_STEP": "4", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests" / "fixtures" / "hold_at_step"), os.environ.get("PYTHONPATH", "")])}
    proc = _train(args_b, tmp_path / "b.log", hold, popen=True)
    commit = run_b / "stage2-n3" / "checkpoint-4" / "idlm_commit.json"
    deadline = time.time() + 300
    while not commit.exists():
        assert proc.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun; the ranks die with their parent
    proc.wait()
    deadline = time.time() + 30
    while _workers_of(str(run_b)):
        assert time.time() < deadline, "ranks outlived their killed launcher"
        time.sleep(0.2)
    assert not (run_b / "stage2-n3" / STAGE_DONE_FILE).exists()
    assert not (run_b / "stage2-n3" / "checkpoint-8").exists()
    _train(args_b, tmp_path / "b.log")
    log_b = (tmp_path / "b.log").read_text()
    assert "stage 1 (stride 2) already finished" in log_b
    assert "resuming from" in log_b and "checkpoint-4" in log_b
    rows_b = [json.loads(line) for line in (run_b / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b if "loss" in r] == list(range(1, 9))  # steps 5..8 logged once
    assert _max_diff(_weights(run_a / "stage2-n3"), _weights(run_b / "stage2-n3")) < 1e-6


def test_global_normalisation_two_ranks_zero2_equals_one_process(assets, tmp_path):
    """One SGD step (no clipping: the update is the gradient) on the same 4 rows: 2 ranks x 2 rows with DeepSpeed
    ZeRO-2 and 1 process x 4 micro-batches of 1 row give the same weights. Wrong rank or accumulation scaling
    would change the update by a factor (the update itself is ~0.3)."""
    common = [f"model_name_or_path={assets['idlm_base']}", "optim=sgd", "max_grad_norm=0", "max_steps=1",
              "warmup_ratio=0", "learning_rate=0.5", "lr_scheduler_type=constant", "disable_shuffling=true",
              "save_steps=100", "stages=[{stride: 3, auto_balance: true, alpha: 1.0}]"]
    _train([*common, f"output_dir={tmp_path / 'r2'}", "per_device_train_batch_size=2",
            "gradient_accumulation_steps=1"], tmp_path / "r2.log")
    _train([*common, f"output_dir={tmp_path / 'r1'}", "per_device_train_batch_size=1", "gradient_accumulation_steps=4",
            "deepspeed=null", "nproc_per_node=1"], tmp_path / "r1.log")
    two, one = _weights(tmp_path / "r2" / "stage1-n3"), _weights(tmp_path / "r1" / "stage1-n3")
    base = load_file(str(Path(assets["idlm_base"]) / "model.safetensors"))
    assert _max_diff(one, base) > 0.1
    assert _max_diff(two, one) < 1e-5


def test_compile_layers_recipe_key_gives_the_eager_update(assets, tmp_path):
    """`compile_layers: true` (each decoder layer torch.compiled, as measured in docs/results/training_throughput.md)
    runs through LlamaFactory and takes the same SGD step as the eager model."""
    common = [f"model_name_or_path={assets['idlm_base']}", "optim=sgd", "max_grad_norm=0", "max_steps=1",
              "warmup_ratio=0", "learning_rate=0.5", "lr_scheduler_type=constant", "disable_shuffling=true",
              "save_steps=100", "stages=[{stride: 3}]", "per_device_train_batch_size=2",
              "gradient_accumulation_steps=1", "deepspeed=null", "nproc_per_node=1"]
    _train([*common, f"output_dir={tmp_path / 'eager'}"], tmp_path / "eager.log")
    _train([*common, f"output_dir={tmp_path / 'comp'}", "compile_layers=true"], tmp_path / "comp.log")
    eager, comp = _weights(tmp_path / "eager" / "stage1-n3"), _weights(tmp_path / "comp" / "stage1-n3")
    base = load_file(str(Path(assets["idlm_base"]) / "model.safetensors"))
    assert _max_diff(eager, base) > 0.1
    assert _max_diff(comp, eager) < 1e-4


def test_gated_lora_training_for_risd(assets, tmp_path):
    """Gated LoRA on the frozen plain base, noisy-half loss only; the adapter loads in the reference engine with
    --lora and decodes exactly the base model's greedy output; the LoRA changes only MASK rows."""
    from idlm.checkpoint import load_causal_lm
    from idlm.inference.engine import ISDEngine, SamplingParams
    from idlm.lora import load_gated_lora

    out = tmp_path / "lora"
    _train([f"model_name_or_path={assets['base']}", f"output_dir={out}", "stages=[{stride: 3}]",
            "finetuning=gated_lora", "alpha=0", "lora_rank=8", "deepspeed=null", "nproc_per_node=1", "max_steps=6",
            "learning_rate=5e-3", "save_steps=100"], tmp_path / "lora.log")
    adapter = out / "stage1-n3"
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(r["clean_weight"] == 0.0 and r["loss"] == pytest.approx(r["ce_noisy"], rel=1e-6) for r in steps)
    assert steps[-1]["ce_noisy"] < steps[0]["ce_noisy"]
    meta = json.loads((adapter / "idlm_adapter.json").read_text())["idlm"]
    assert meta["stride"] == 3 and meta["gated"] is True
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    b = [v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and max(float(t.abs().max()) for t in b) > 0  # trained (B starts at zero)

    base_model, tok = load_causal_lm(assets["base"], attn_implementation="sdpa")
    gated, _ = load_gated_lora(load_causal_lm(assets["base"], attn_implementation="sdpa")[0], str(adapter))
    mask = meta["mask_token_id"]
    ids = torch.tensor([tok("What is 3 plus 4?").input_ids + [mask, mask]])
    with torch.no_grad():
        want, got = base_model(input_ids=ids).logits, gated(input_ids=ids).logits
    assert torch.equal(got[:, :-2], want[:, :-2]) and (got[:, -2:] - want[:, -2:]).abs().max() > 1e-4

    engine = ISDEngine.from_pretrained(assets["base"], lora=str(adapter), device="cpu")
    ar = ISDEngine.from_pretrained(assets["base"], stride=1, device="cpu")
    assert engine.stride == 3 and engine.mask_token_id == mask
    chats = [[{"role": "user", "content": f"What is {a} plus {b}?"}] for a, b in [(1, 2), (7, 9), (12, 3)]]
    prompts = [tok(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)).input_ids for c in chats]
    params = SamplingParams(max_new_tokens=24)
    want = [o.token_ids for o in ar.generate(prompts, params)]
    assert [o.token_ids for o in engine.generate(prompts, params)] == want


def test_deepspeed_patch_matches_pinned_version(monkeypatch):
    """training/ds_patch.py edits DeepSpeed internals: pin the version and the mechanism it relies on."""
    import deepspeed

    from idlm.training.ds_patch import PINNED_DEEPSPEED, skip_cpu_shm_comm_build

    assert deepspeed.__version__ == PINNED_DEEPSPEED, "DeepSpeed moved: re-check training/ds_patch.py"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code = ("from idlm.training.ds_patch import skip_cpu_shm_comm_build as s; assert s(); "
            "from deepspeed.comm.torch import build_shm_op; assert build_shm_op() is None; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    assert callable(skip_cpu_shm_comm_build)
