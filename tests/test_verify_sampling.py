"""The fused sampled verification kernel (inference/sglang_isd/verify_sampling.py) against its PyTorch definition,
on CPU through Triton's interpreter; tests/gpu/test_verify_sampling_gpu.py runs the same cases compiled. The stepper
path that uses it is the reference's on CPU, so the stepper's exactness tests cover the rule it implements."""

from __future__ import annotations

import pytest

from tests.helpers import run_in_triton_interpreter

pytest.importorskip("triton")


def test_kernel_equals_definition_in_triton_interpreter():
    from tests.verify_sampling_cases import CASES

    proc = run_in_triton_interpreter("tests.verify_sampling_cases")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == len(CASES) + 2, proc.stdout
    assert "ok no drafts" in lines and "ok shapes refused" in lines
