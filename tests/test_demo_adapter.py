"""The committed R-ISD adapter of the demo (configs/demo/adapter): what scripts/demo.py loads is what was measured."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "configs" / "demo" / "adapter"


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_adapter_matches_its_hashes_and_size_limit():
    _demo().check_sha256sums(ADAPTER)  # raises SystemExit on any mismatch
    names = {line.split()[1] for line in (ADAPTER / "SHA256SUMS").read_text().splitlines()}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "idlm_adapter.json"}
    assert sum((ADAPTER / n).stat().st_size for n in names) <= 4 * 1024 * 1024
    meta = json.loads((ADAPTER / "idlm_adapter.json").read_text())["idlm"]
    assert meta["gated"] is True and meta["stride"] == 4 and meta["mask_token_id"] == 16


def test_a_changed_adapter_file_is_refused(tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(ADAPTER, copy)
    blob = bytearray((copy / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 1
    (copy / "adapter_model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(SystemExit, match="adapter_model.safetensors"):
        _demo().check_sha256sums(copy)


def test_adapter_weights_fit_smollm2_135m():
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(ADAPTER / "adapter_model.safetensors"), "pt") as f:
        for k in f.keys():
            shapes[k] = tuple(f.get_slice(k).get_shape())
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in shapes}
    assert layers == set(range(30))  # SmolLM2-135M: 30 decoder layers
    q_a = next(v for k, v in shapes.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    assert q_a == (6, 576)  # rank 6 on hidden size 576
