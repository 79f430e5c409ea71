"""The ISD worker's opt-in step profiler (``IDLM_ISD_PROFILE=N``); no SGLang import, tested on CPU."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch

log = logging.getLogger(__name__)

ENV_PROFILE = "IDLM_ISD_PROFILE"


class StepProfiler:
    """Where an ISD decode iteration's time goes, logged every ``every`` steps (``IDLM_ISD_PROFILE=N``; off by
    default because it synchronises the GPU between phases).

    Phases: ``host`` (from the end of the previous decode step to the start of this one: SGLang's scheduler, result
    processing, KV reservation), ``build`` (step rows), ``forward`` (the TARGET_VERIFY forward incl. logits),
    ``commit`` (verification, next drafts). Means in ms, per batch size bucket.
    """

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"StepProfiler logs every N >= 1 steps, got {every}")
        self.every = every
        self.sums: dict[int, list[float]] = defaultdict(lambda: [0.0] * 5)  # host, build, fwd, commit, graphs
        self.counts: dict[int, int] = defaultdict(int)
        self.last_end: float | None = None
        self.steps = 0

    @classmethod
    def from_env(cls) -> StepProfiler | None:
        """The profiler ``IDLM_ISD_PROFILE=N`` asks for (None when unset or 0)."""
        raw = os.environ.get(ENV_PROFILE, "").strip() or "0"
        try:
            every = int(raw)
        except ValueError:
            raise ValueError(f"{ENV_PROFILE} must be a whole number of steps, got {raw!r}") from None
        return cls(every) if every > 0 else None

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
