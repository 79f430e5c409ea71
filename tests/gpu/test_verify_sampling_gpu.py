"""The fused sampled verification kernel compiled on CUDA against its PyTorch definition (the cases of
tests/verify_sampling_cases.py), and the SGLang stepper with it on: its sampled steps against the exact AR
distribution (the G test of tests/gpu/test_sampling_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kernel_equals_definition_on_cuda(capsys):
    from tests.verify_sampling_cases import run

    assert run("cuda") == 0, capsys.readouterr().out


def test_stepper_with_fused_verify_follows_the_ar_distribution():
    from tests.isd_helpers import bigram_stepper_samples, g_test

    samples, exact = bigram_stepper_samples("cuda", "argmax", 200_000, fused_verify=True)
    p_value, df = g_test(exact, samples)
    assert df > 50 and p_value > 1e-3, (p_value, df)
