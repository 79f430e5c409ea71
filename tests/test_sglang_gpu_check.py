"""scripts/dev/sglang_gpu_check.py's arithmetic on measured step times (the GPU run itself needs CUDA and SGLang):
the cross-backend step ratios that its speed checks and docs/results/serving_backends.md come from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check_script():
    spec = importlib.util.spec_from_file_location("sglang_gpu_check", ROOT / "scripts/dev/sglang_gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratios_against_each_and_the_faster_ar_backend(check_script):
    # AR is faster on flashinfer at C = 32 and on triton at C = 64: "the faster AR" follows C
    steps = {("flashinfer", "isd", "greedy"): {32: 9.0, 64: 12.0},
             ("flashinfer", "ar", "greedy"): {32: 6.0, 64: 8.0},
             ("triton", "isd", "greedy"): {32: 8.4, 64: 14.0},
             ("triton", "ar", "greedy"): {32: 7.0, 64: 7.5}}
    got, table = check_script.backend_ratios(steps, [32, 64], {"greedy": {32: 1.35, 64: 1.75}})
    pairs = got["pairs"]["greedy"]
    assert pairs["flashinfer"]["triton"]["32"] == pytest.approx(9.0 / 7.0)
    assert pairs["triton"]["flashinfer"]["64"] == pytest.approx(14.0 / 8.0)
    assert got["faster_ar"]["greedy"] == {"32": {"backend": "flashinfer", "step_ms": 6.0},
                                          "64": {"backend": "triton", "step_ms": 7.5}}
    # ranked at the largest C with a target (64): flashinfer ISD 12.0 / 7.5 = 1.6 beats triton's 14.0 / 7.5, though
    # triton ISD is the faster one at C = 32
    best = got["best"]["greedy"]
    assert best["isd_backend"] == "flashinfer"
    assert best["ratio"] == {"32": pytest.approx(9.0 / 6.0), "64": pytest.approx(12.0 / 7.5)}
    assert "sampled" not in got["best"]  # nothing sampled was measured
    assert "| flashinfer | the faster AR | 1.50 | 1.60 |" in table
    assert "| | faster AR: backend, step ms | flashinfer 6.00 | triton 7.50 |" in table
    assert "| | target | <= 1.35 | <= 1.75 |" in table


def test_missing_measurements_are_not_ratios(check_script):
    # a server whose C = 64 run failed has no step time there: its ratio is None and it ranks last
    steps = {("triton", "isd", "sampled"): {32: 10.0, 64: None},
             ("flashinfer", "isd", "sampled"): {32: 11.0, 64: 15.0},
             ("triton", "ar", "sampled"): {32: 7.0, 64: 9.0}}
    got, table = check_script.backend_ratios(steps, [32, 64], {"sampled": {32: 1.4, 64: 1.8}})
    assert got["pairs"]["sampled"]["triton"]["triton"]["64"] is None
    assert got["best"]["sampled"]["isd_backend"] == "flashinfer"
    assert got["best"]["sampled"]["ratio"]["64"] == pytest.approx(15.0 / 9.0)
    assert "| triton | the faster AR | 1.43 | - |" in table


def test_issue_targets_are_the_checked_ones(check_script):
    # the speed checks read these (greedy and sampled, against the faster AR backend, one H200)
    assert check_script.STEP_RATIO_TARGETS == {"greedy": {32: 1.35, 64: 1.75}, "sampled": {32: 1.40, 64: 1.80}}
