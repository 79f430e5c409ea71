"""The fused sampled verification kernel (inference/sglang_isd/verify_sampling.py) against its PyTorch definition,
on CPU through Triton's interpreter (in a subprocess with TRITON_INTERPRET=1: triton picks interpreted or compiled
mode when it is first imported); tests/gpu/test_verify_sampling_gpu.py runs the same cases compiled. The stepper
path that uses it is the reference's on CPU, so the stepper's exactness tests cover the rule it implements."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_kernel_equals_definition_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "tests.verify_sampling_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    from tests.verify_sampling_cases import CASES

    assert sum(line.startswith("ok ") for line in lines) == len(CASES) + 2, proc.stdout
    assert "ok no drafts" in lines and "ok shapes refused" in lines
