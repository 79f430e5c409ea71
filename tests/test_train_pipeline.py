"""`idlm train RECIPE` as one pipeline on a tiny model, as a user runs it: convert the base, sample its responses as
training data, the stride curriculum with distillation (own loop and LlamaFactory), a gated-LoRA adapter stage,
and the evaluation hooks (quality against the base, ISD == AR, R-ISD == base)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from idlm.training.curriculum import STAGE_DONE_FILE
from idlm.training.tiny_assets import build_tiny_assets

REPO = Path(__file__).resolve().parents[1]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu",
       "TRANSFORMERS_VERBOSITY": "error", "DISABLE_VERSION_CHECK": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    assets = build_tiny_assets(root / "assets")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(6)))
    gsm = root / "gsm8k_test.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"Tom has {i} apples. How many?",
                                       "answer": f"He has {i}.\n#### {i}"}) + "\n" for i in range(3)))
    ife = root / "ifeval.jsonl"
    ife.write_text("".join(json.dumps({"prompt": f"Write {i} words."}) + "\n" for i in range(2)))
    return {"root": root, "base": assets["base"], "prompts": str(prompts), "gsm8k": str(gsm), "ifeval": str(ife)}


def _recipe(files, out: Path, trainer: str) -> Path:
    recipe = {
        "base": {"model": files["base"]},
        "generate": {"sources": [{"kind": "prompts", "file": files["prompts"]}], "samples_per_prompt": 2,
                     "max_new_tokens": 12, "temperature": 1.0, "keep_truncated": True, "batch_size": 8,
                     "dtype": "float32"},
        "trainer": trainer,
        "template": "chatml", "cutoff_len": 64, "preprocessing_num_workers": None, "dataloader_num_workers": 0,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "optim": "adamw_torch",
        "learning_rate": 1.0e-3, "max_steps": 3, "seed": 1, "logging_steps": 1, "save_steps": 100,
        "report_to": "none", "output_dir": str(out), "work_dir": str(out.parent / "work"),
        "alpha": 0.0, "distill_kl": 1.0, "distill_soft": 0.5,
        "stages": [{"stride": 2}, {"stride": 3, "distill_accept": 2.0}],  # the acceptance gap in stage 2
        "adapter": {"stride": 3, "lora_rank": 4, "lora_alpha": 8, "learning_rate": 1.0e-3, "max_steps": 2,
                    "trainer": "idlm"},
        "evaluate": {"gsm8k": files["gsm8k"], "ifeval": files["ifeval"], "limit": 3, "strides": [2, 3],
                     "max_new_tokens": 8, "batch_size": 4, "kl_prompts": 2, "kl_tokens": 6},
    }
    path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(recipe: Path, log: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "idlm.cli", "train", str(recipe), *extra]
    with log.open("a") as fh:
        rc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=fh, stderr=subprocess.STDOUT,
                            timeout=900).returncode
    text = log.read_text()
    assert rc == 0, text[-4000:]
    return text


def _check_outputs(out: Path, work: Path) -> dict:
    assert (work / "base" / "config.json").is_file() and (work / "converted" / "config.json").is_file()
    rows = [json.loads(line) for line in (work / "data" / "train.jsonl").read_text().splitlines()]
    assert 6 <= len(rows) <= 12 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    report = json.loads((work / "data" / "train.json").read_text())
    assert report["sampling"]["temperature"] == 1.0 and report["prompts"] == 6
    for d in ("stage1-n2", "stage2-n3", "adapter3-n3"):
        assert (out / d / STAGE_DONE_FILE).is_file(), d
    res = json.loads((out / "eval.json").read_text())
    conv = res["converted"]
    assert conv["quality"]["kl_per_token"] >= 0 and conv["quality"]["tokens"] > 0
    for key, s in conv["isd"].items():
        if "greedy" in key:
            assert s["equal_to_ar"] == s["requests"], key  # greedy ISD == greedy AR, always
        assert 1.0 <= s["tpf"] <= s["stride"]
    assert {"gsm8k_greedy_n2", "gsm8k_greedy_n3", "ifeval_greedy_n3", "gsm8k_t1_n3"} <= set(conv["isd"])
    _check_adapter(res["adapter"]["isd"], stride=3)
    return res


def _check_adapter(isd: dict, stride: int) -> None:
    """R-ISD greedy == the base model's greedy output; sampled R-ISD reported at the hooks' temperature."""
    assert {f"gsm8k_greedy_n{stride}", f"ifeval_greedy_n{stride}", f"gsm8k_t1_n{stride}"} <= set(isd)
    for key, s in isd.items():
        if "greedy" in key:
            assert s["equal_to_ar"] == s["requests"], key
        else:
            assert "equal_to_ar" not in s and s["requests"] > 0, key
        assert 1.0 <= s["tpf"] <= stride, key


def _check_accept_gap(log: list[dict]) -> None:
    """Stage 2 trains with distill_accept 2: its logged gap is a rejection rate in (0, 1) and, in the own loop,
    counts in the loss; stage 1 logs the gap too (a teacher is in use) without training on it."""
    for stage in (1, 2):
        rows = [r for r in log if r["stage"] == stage and "accept_gap_noisy" in r]
        assert rows and all(0 < r["accept_gap_noisy"] < 1 for r in rows), stage
    own = [r for r in log if r["stage"] == 2 and "ce_noisy" in r and "lr" in r]
    for r in own:  # the own loop's row holds the combination it trained on
        want = (0.5 * r["ce_noisy"] + 0.5 * r["kl_noisy"] + 2.0 * r["accept_gap_noisy"] + r["weight"] * r["ce_clean"]
                + r["kl_clean"])
        assert abs(r["loss"] - want) < 1e-9


def test_pipeline_own_loop(files, tmp_path):
    out = tmp_path / "idlm"
    recipe = _recipe(files, out, "idlm")
    text = _run(recipe, tmp_path / "loop.log")
    assert "generate:" in text and "evaluate:" in text
    _check_outputs(out, tmp_path / "work")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {1, 2, 3}
    first = next(r for r in log if r["stage"] == 1)
    assert abs(first["kl_clean"]) < 1e-6  # the teacher is the model before conversion: KL starts at 0
    _check_accept_gap(log)
    # a rerun finds every phase done and changes nothing
    before = (out / "stage2-n3" / "model.safetensors").read_bytes()
    text = _run(recipe, tmp_path / "loop2.log", "--phases", "prepare,generate,train")
    assert "already finished" in text and (out / "stage2-n3" / "model.safetensors").read_bytes() == before


def test_pipeline_llamafactory_with_teacher(files, tmp_path):
    pytest.importorskip("llamafactory")
    out = tmp_path / "lf"
    recipe = _recipe(files, out, "llamafactory")
    _run(recipe, tmp_path / "lf.log")
    _check_outputs(out, tmp_path / "work")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    lf_rows = [r for r in log if r["stage"] in (1, 2)]
    assert lf_rows and all("kl_clean" in r and "kl_noisy" in r for r in lf_rows)
    assert abs(lf_rows[0]["kl_clean"]) < 1e-6
    _check_accept_gap(lf_rows)


def test_adapter_only_recipe(files, tmp_path):
    """`stages: []` with an adapter section: R-ISD on the unchanged base, nothing converted is trained; the hooks
    report the adapter (== the base's greedy output) and no converted model. Without an adapter the same recipe is
    refused."""
    out = tmp_path / "adapter_only"
    recipe = _recipe(files, out, "idlm")
    raw = yaml.safe_load(recipe.read_text())
    raw["stages"] = []
    recipe.write_text(yaml.safe_dump(raw))
    _run(recipe, tmp_path / "adapter.log")
    assert (out / "adapter1-n3" / STAGE_DONE_FILE).is_file() and not (out / "stage1-n2").exists()
    res = json.loads((out / "eval.json").read_text())
    assert "converted" not in res and res["base_quality"]["heldout_nll"] > 0
    _check_adapter(res["adapter"]["isd"], stride=3)
    raw.pop("adapter")
    recipe.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "idlm.cli", "train", "--dry-run", str(recipe)], cwd=REPO,
                       env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no 'adapter' section: nothing to train" in r.stderr


def test_sweep_driver_serves_each_run_as_it_trains(files, tmp_path):
    """scripts/small_scale.py with serve.when = each: two runs train at once (`--phases train`); as each ends, its
    evaluation hooks (`--phases evaluate`) and its serving start: the converted run at the sweep's stride, the base
    with the adapter run's gated LoRA; `idlm eval` scores both through the shipped commands."""
    pytest.importorskip("uvicorn")
    recipe = _recipe(files, tmp_path / "unused", "idlm")
    sweep = {"recipe": str(recipe), "set": ["generate.temperature=0.7"],  # the sweep's own data settings
             "runs": {"conv": ["adapter=null", "evaluate.strides=[2]"], "lora": ["stages=[]"]},
             "serve": {"when": "each", "engine": "native", "stride": 2, "adapter_run": "lora",
                       "benchmarks": {"gsm8k": 2}, "concurrency": 2, "max_tokens": 8,
                       "serve_args": "--draft-mode argmax",  # reaches `idlm serve` (a bad flag would stop it)
                       "eval_args": f"--data-dir {REPO / 'tests/fixtures/eval/data'} --no-verify-data"},
             "targets": {"kl_per_token": 0.05, "nll_ratio": 1.02}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "scripts/small_scale.py", "--sweep", str(path), "--out", str(out)], cwd=REPO,
                       env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "sweep.json").read_text())
    assert res["exit_codes"] == {"conv": 0, "lora": 0} and res["chosen"] == "conv"
    assert json.loads((out / "work" / "data" / "train.json").read_text())["sampling"]["temperature"] == 0.7
    assert "converted" in res["runs"]["conv"] and "adapter" not in res["runs"]["conv"]
    assert "adapter" in res["runs"]["lora"] and "converted" not in res["runs"]["lora"]
    for name in ("conv", "base+adapter"):
        got = res["served"][name]["gsm8k"]  # greedy on the native engine: the first sweep's layout
        assert got["exit"] == 0 and got["summary"]["n_scored"] == 2 and got["summary"]["complete"], (name, got)
    assert res["served"]["conv"]["gsm8k"]["summary"]["mean_tpf"] >= 1.0  # ISD statistics from the native server
    log = (out / "conv.log").read_text()
    assert "evaluate:" in log  # the hooks ran as their own `idlm train --phases evaluate`
    assert "conv: training exit 0" in r.stdout and "conv: evaluation exit 0" in r.stdout


@pytest.mark.parametrize("path", sorted((REPO / "configs/train").glob("*sweep*.yaml")), ids=lambda p: p.stem)
def test_committed_sweep_files_are_well_formed(path):
    """Each committed sweep file names a recipe that is there, runs as lists of KEY=VALUE overrides that apply to
    it, a `set:` list of the same form, and a serve section the driver accepts (a GPU session must not find out
    on the machine)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import small_scale
    finally:
        sys.path.pop(0)
    from idlm.training.recipe import apply_overrides, load_recipe

    sweep = yaml.safe_load(path.read_text())
    recipe = REPO / sweep["recipe"]
    assert recipe.is_file(), recipe
    sweep_set = sweep.get("set") or []
    runs = sweep["runs"]
    assert runs and all(isinstance(v, list) for v in runs.values())
    for name, overrides in {"": sweep_set, **runs}.items():
        assert all(isinstance(x, str) and "=" in x for x in overrides), (name, overrides)
        merged = apply_overrides(load_recipe(recipe), [*sweep_set, *overrides])
        assert merged["base"], name
    if "serve" in sweep:
        st = small_scale.ServeSettings.from_sweep(sweep["serve"], None)
        assert st.adapter_run is None or st.adapter_run in runs
        cmd, extra = st.serve_command(["--model", "M"], 1234), shlex.split(st.serve_args)
        assert cmd[len(cmd) - len(extra):] == extra
        assert "--draft-mode" not in st.serve_command(["--ar", "--model", "M"], 1234)  # the base serves plain AR
    assert set(sweep["targets"]) == {"kl_per_token", "nll_ratio"}
