"""Performance switches of the ISD worker that need no SGLang import (so they are tested on CPU): the verify
attention kernel choice and the opt-in step profiler."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch

log = logging.getLogger("idlm.inference.sglang_isd.worker")


def use_splitkv_verify(backend) -> bool:
    """Route the triton backend's TARGET_VERIFY attention through SGLang's split-KV verify kernel.

    SGLang's triton backend runs a verify step through its prefill kernel, which tiles queries by 128 rows per
    (request, head) and walks the prefix serially: for ISD's 2N - 1 rows per request that is mostly padding. SGLang
    0.5.15 ships ``verify_splitkv_fwd`` (flash-decode over the prefix, then the small causal block of step rows) for
    EAGLE's top-k = 1 chain, enabled only on AMD gfx95. Its precondition is ours exactly: pure causal attention over
    [prefix | step rows], the same number of rows per request, no sinks / sliding window / logit cap (it checks
    those per call and falls back to the prefill kernel otherwise). On an H100 with a Qwen3-8B shape it cut the ISD
    step time by 26% at C = 32 and 30% at C = 64 (docs/results/serving_h100.md). ``IDLM_ISD_SPLITKV=0`` keeps the
    prefill kernel. Returns whether the kernel is on.
    """
    if os.environ.get("IDLM_ISD_SPLITKV", "1") == "0":
        log.info("ISD: IDLM_ISD_SPLITKV=0, verify attention uses the prefill kernel")
        return False
    if not (hasattr(backend, "use_verify_splitkv") and callable(getattr(backend, "verify_splitkv_fwd", None))):
        log.info("ISD: attention backend %s has no split-KV verify kernel; verify uses its own path",
                 type(backend).__name__)
        return False
    backend.use_verify_splitkv = True
    log.info("ISD: verify attention uses SGLang's split-KV verify kernel (triton backend)")
    return True


class StepProfiler:
    """Where an ISD decode iteration's time goes, logged every ``every`` steps (``IDLM_ISD_PROFILE=N``; off by
    default because it synchronises the GPU between phases).

    Phases: ``host`` (from the end of the previous decode step to the start of this one: SGLang's scheduler, result
    processing, KV reservation), ``build`` (step rows), ``forward`` (the TARGET_VERIFY forward incl. logits),
    ``commit`` (verification, next drafts). Means in ms, per batch size bucket.
    """

    def __init__(self, every: int):
        self.every = every
        self.sums: dict[int, list[float]] = defaultdict(lambda: [0.0] * 5)  # host, build, fwd, commit, graphs
        self.counts: dict[int, int] = defaultdict(int)
        self.last_end: float | None = None
        self.steps = 0

    @staticmethod
    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def record(self, bs: int, start: float, marks: list[float], graph: bool) -> None:
        host = start - self.last_end if self.last_end is not None and start - self.last_end < 1.0 else 0.0
        phases = [host, marks[0] - start, marks[1] - marks[0], marks[2] - marks[1], float(graph)]
        bucket = 1 << max(bs - 1, 0).bit_length()
        for i, v in enumerate(phases):
            self.sums[bucket][i] += v
        self.counts[bucket] += 1
        self.last_end = marks[2]
        self.steps += 1
        if self.steps % self.every == 0:
            for b in sorted(self.counts):
                n, (h, bu, f, c, g) = self.counts[b], self.sums[b]
                log.warning("ISD profile bs<=%d (%d steps): host %.2f ms, build %.2f, forward %.2f, commit %.2f; "
                            "CUDA graph on %.0f%%", b, n, 1e3 * h / n, 1e3 * bu / n, 1e3 * f / n, 1e3 * c / n,
                            100 * g / n)
            self.sums.clear()
            self.counts.clear()
