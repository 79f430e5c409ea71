"""scripts/convert_qwen3_to_idlm.sh: converts the base once, then hands the recipe and the launch geometry to
`idlm train` (checked with --dry-run on a tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from idlm.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/convert_qwen3_to_idlm.sh"


def _run(args, env_extra, cwd):
    env = {**os.environ, "IDLM": f"{sys.executable} -m idlm.cli", **env_extra}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_script_converts_then_plans(tmp_path):
    base = tmp_path / "Qwen3-Tiny"
    build_tiny_model(base, arch="qwen3", free_rows=8)
    env = {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "BASE": str(base)}
    r = _run(["--recipe", str(REPO / "configs/train/qwen3_8b_idlm.yaml"), "--output-dir", str(tmp_path / "run"),
              "--master-port", "29555", "--dry-run", "stages.2.alpha=0.5"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    converted = tmp_path / "checkpoints" / "qwen3-tiny-idlm"
    assert json.loads((converted / "config.json").read_text())["idlm"]["stride"] == 2
    plan = json.loads(r.stdout)
    assert plan["launch"] == {"launcher": "torchrun", "nproc_per_node": 4, "nnodes": 2, "node_rank": 0,
                              "master_addr": "10.0.0.1", "master_port": 29555, "hostfile": None}
    assert plan["stages"][0]["lf_args"]["model_name_or_path"] == str(converted.resolve())
    assert [s["settings"]["stride"] for s in plan["stages"]] == [2, 3, 4]
    assert plan["stages"][2]["settings"]["alpha"] == 0.5 and plan["output_dir"] == str(tmp_path / "run")
    # a second call finds the conversion done and does not convert again
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    r = _run(["--dry-run", "--recipe", str(REPO / "configs/train/qwen3_8b_idlm.yaml")], env, tmp_path)
    assert r.returncode == 0 and "converting" not in r.stderr
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    r = _run(["--bogus"], env, tmp_path)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
