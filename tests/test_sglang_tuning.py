"""The ISD worker's performance switches that need no SGLang (inference/sglang_isd/tuning.py)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from idlm.inference.sglang_isd.tuning import StepProfiler, use_splitkv_verify


def _triton_like_backend():
    return SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=lambda *a, **k: True)


def test_splitkv_verify_switched_on_for_a_backend_that_has_it(monkeypatch):
    monkeypatch.delenv("IDLM_ISD_SPLITKV", raising=False)
    backend = _triton_like_backend()
    assert use_splitkv_verify(backend) is True
    assert backend.use_verify_splitkv is True


def test_splitkv_verify_off_by_env(monkeypatch):
    monkeypatch.setenv("IDLM_ISD_SPLITKV", "0")
    backend = _triton_like_backend()
    assert use_splitkv_verify(backend) is False
    assert backend.use_verify_splitkv is False


def test_splitkv_verify_left_alone_on_other_backends(monkeypatch):
    monkeypatch.delenv("IDLM_ISD_SPLITKV", raising=False)
    flashinfer_like = SimpleNamespace()
    assert use_splitkv_verify(flashinfer_like) is False
    assert not hasattr(flashinfer_like, "use_verify_splitkv")
    no_kernel = SimpleNamespace(use_verify_splitkv=False, verify_splitkv_fwd=None)
    assert use_splitkv_verify(no_kernel) is False
    assert no_kernel.use_verify_splitkv is False


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
