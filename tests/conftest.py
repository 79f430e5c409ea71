"""Shared fixtures: tiny random models built offline (no hub access anywhere in the suite)."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.tiny import build_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A saved tiny random Qwen3 (with free embedding rows) and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    build_tiny_model(path, arch="qwen3", free_rows=8, seed=0)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny random Llama whose tokenizer uses every embedding row (conversion must resize)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_model(path, arch="llama", free_rows=0, tie=True, seed=1)
    return str(path)


@pytest.fixture()
def fake_idlm_model(tmp_path):
    """A directory that looks like an I-DLM checkpoint to the launcher's pre-checks (config.json only)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "idlm": {"mask_token_id": 5, "stride": 2}}))
    return str(d)
