"""The GQA-packed ISD verify attention kernel compiled on a GPU: the CPU test's cases in float32, and bfloat16."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cases_compiled():
    pytest.importorskip("triton")
    from idlm.inference.sglang_isd import verify_attention as va
    from tests.verify_attention_cases import check_causal, check_definition

    # float32 inputs: tl.dot runs in TF32 on a GPU (10-bit mantissa), hence the looser tolerance than on CPU
    assert len(check_definition(va, "cuda", tol=5e-3)) == 4
    check_causal(va, "cuda")
    assert len(check_definition(va, "cuda", torch.bfloat16, tol=3e-2)) == 4
