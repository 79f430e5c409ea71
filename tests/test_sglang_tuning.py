"""The ISD worker's performance switches that need no SGLang (inference/sglang_isd/tuning.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from idlm.inference.sglang_isd.tuning import ENV_VERIFY_ATTENTION, StepProfiler, select_verify_attention


def _triton_like_backend(calls=None):
    def splitkv(*args, **kwargs):
        if calls is not None:
            calls.append((args, kwargs))
        return True

    return SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=splitkv)


def test_verify_attention_default_is_the_gqa_kernel_and_splitkv_by_env(monkeypatch):
    monkeypatch.delenv(ENV_VERIFY_ATTENTION, raising=False)
    backend = _triton_like_backend()
    original = backend.verify_splitkv_fwd
    assert select_verify_attention(backend) == "gqa"
    assert backend.use_verify_splitkv is True and backend.verify_splitkv_fwd is not original
    monkeypatch.setenv(ENV_VERIFY_ATTENTION, "splitkv")
    backend = _triton_like_backend()
    original = backend.verify_splitkv_fwd
    assert select_verify_attention(backend) == "splitkv"
    assert backend.use_verify_splitkv is True and backend.verify_splitkv_fwd is original


def test_verify_attention_prefill_by_env_and_bad_value(monkeypatch):
    monkeypatch.setenv(ENV_VERIFY_ATTENTION, "prefill")
    backend = _triton_like_backend()
    assert select_verify_attention(backend) == "prefill"
    assert backend.use_verify_splitkv is False
    with pytest.raises(ValueError, match="must be one of"):
        select_verify_attention(backend, "fast")


def test_verify_attention_left_alone_on_other_backends(monkeypatch):
    monkeypatch.delenv(ENV_VERIFY_ATTENTION, raising=False)
    flashinfer_like = SimpleNamespace()
    assert select_verify_attention(flashinfer_like) == "backend"
    assert not hasattr(flashinfer_like, "use_verify_splitkv")
    no_kernel = SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=None)
    assert select_verify_attention(no_kernel, "gqa") == "backend"
    assert no_kernel.use_verify_splitkv is False


def _verify_args(batch=2, rows=7, heads=8, kv_heads=2, dim=16):
    q = torch.zeros(batch * rows, heads, dim)
    k = torch.zeros(batch * rows, kv_heads, dim)
    buf = torch.zeros(10, kv_heads, dim)
    indptr = torch.tensor([0, 3, 6], dtype=torch.int32)
    return [q, k, k.clone(), torch.empty_like(q), buf, buf.clone(), indptr, indptr, torch.arange(6), None, True,
            indptr, rows, 1.0, 1.0, 0.25]


def test_gqa_kernel_takes_isd_shape_and_hands_the_rest_back(monkeypatch):
    pytest.importorskip("triton")
    import idlm.inference.sglang_isd.verify_attention as va

    ran = []
    monkeypatch.setattr(va, "isd_verify_attention", lambda *a: ran.append(a))
    calls = []
    backend = _triton_like_backend(calls)
    assert select_verify_attention(backend, "gqa") == "gqa" and backend.use_verify_splitkv
    assert backend.verify_splitkv_fwd(*_verify_args()) is True
    assert len(ran) == 1 and ran[0][8] == 7 and ran[0][9] == 0.25 and not calls  # rows, scale; no fallback
    for change in (dict(sinks=torch.zeros(8)), dict(logit_cap=30.0), dict(sliding_window_size=128)):
        assert backend.verify_splitkv_fwd(*_verify_args(), **change) is True
    args = _verify_args()
    args[13] = 0.5  # an fp8 KV scale
    backend.verify_splitkv_fwd(*args)
    args = _verify_args()
    args[12] = 5  # rows that do not tile the batch uniformly
    backend.verify_splitkv_fwd(*args)
    assert len(ran) == 1 and len(calls) == 5  # everything but ISD's plain shape went to SGLang's kernel


def test_step_profiler_means_per_bucket(caplog):
    prof = StepProfiler(every=2)
    with caplog.at_level(logging.WARNING, logger="idlm.inference.sglang_isd.worker"):
        # batch 3 -> bucket 4; phases (ms): build 1, forward 10, commit 2; host gap 5 ms before the second step
        prof.record(3, 0.000, [0.001, 0.011, 0.013], graph=True)
        prof.record(4, 0.018, [0.019, 0.029, 0.031], graph=False)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("ISD profile bs<=4 (2 steps)")
    assert "host 2.50 ms" in msg  # (0 for the first step, 5 ms for the second) / 2
    assert "build 1.00" in msg and "forward 10.00" in msg and "commit 2.00" in msg
    assert "CUDA graph on 50%" in msg
    assert prof.counts == {}  # reset after logging
