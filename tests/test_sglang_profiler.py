"""The ISD worker's opt-in step profiler (inference/sglang_isd/profiler.py)."""

from __future__ import annotations

import logging

import pytest

from idlm.inference.sglang_isd.profiler import ENV_PROFILE, StepProfiler


def test_step_profiler_means_per_bucket(caplog):
    prof = StepProfiler(every=2)
    with caplog.at_level(logging.WARNING, logger="idlm.inference.sglang_isd.profiler"):
        # batch 3 -> bucket 4; phases (ms): build 1, forward 10, commit 2; host gap 5 ms before the second step
        prof.record(3, 0.000, [0.001, 0.011, 0.013], graph=True)
        prof.record(4, 0.018, [0.019, 0.029, 0.031], graph=False)
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith("ISD profile bs<=4 (2 steps)")
    assert "host 2.50 ms" in msg  # (0 for the first step, 5 ms for the second) / 2
    assert "build 1.00" in msg and "forward 10.00" in msg and "commit 2.00" in msg
    assert "CUDA graph on 50%" in msg
    assert prof.counts == {}  # reset after logging


def test_step_profiler_from_env(monkeypatch):
    monkeypatch.delenv(ENV_PROFILE, raising=False)
    assert StepProfiler.from_env() is None
    monkeypatch.setenv(ENV_PROFILE, "0")
    assert StepProfiler.from_env() is None
    monkeypatch.setenv(ENV_PROFILE, "25")
    assert StepProfiler.from_env().every == 25
    monkeypatch.setenv(ENV_PROFILE, "often")
    with pytest.raises(ValueError, match="whole number"):
        StepProfiler.from_env()
    with pytest.raises(ValueError, match=">= 1"):
        StepProfiler(0)
