"""The GQA-packed ISD verify attention kernel (inference/sglang_isd/verify_attention.py) against its definition, on
CPU through Triton's interpreter. It runs in a subprocess with TRITON_INTERPRET=1 because triton picks interpreted
or compiled mode when it is first imported; tests/gpu/test_verify_attention_gpu.py runs the same cases compiled."""

from __future__ import annotations

import pytest

from tests.helpers import run_in_triton_interpreter

pytest.importorskip("triton")


def test_kernel_equals_definition_in_triton_interpreter():
    proc = run_in_triton_interpreter("tests.verify_attention_cases")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("ok prefix=") for line in lines) == 4, proc.stdout
    assert "ok causal step rows" in lines and "ok split counts" in lines and "ok shapes refused" in lines

