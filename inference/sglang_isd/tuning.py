"""Performance switches of the ISD worker that need no SGLang import (so they are tested on CPU): the verify
attention kernel choice and the opt-in step profiler."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch

log = logging.getLogger("idlm.inference.sglang_isd.worker")


VERIFY_ATTENTION = ("gqa", "splitkv", "prefill")
ENV_VERIFY_ATTENTION = "IDLM_ISD_VERIFY_ATTENTION"


def select_verify_attention(backend, choice: str | None = None) -> str:
    """Choose the kernel of the triton backend's TARGET_VERIFY attention; returns the one in use.

    SGLang's triton backend runs a verify step through its prefill kernel, which tiles queries by 128 rows per
    (request, head) and walks the prefix serially: for ISD's 2N - 1 rows per request that is mostly padding.

    * ``gqa`` (default): this package's `verify_attention.isd_verify_attention` (`gqa_verify_fwd`): flash-decode
      over the prefix that packs the query heads of a KV head with the step rows into one tile, so the prefix KV is
      read once per KV head, not once per query head. On an H100 with a Qwen3-8B shape it cut the ISD step from
      17.83 to 14.40 ms at C = 32 and from 28.81 to 21.79 ms at C = 64 against ``splitkv``, with greedy outputs
      unchanged (docs/results/serving_h100.md);
    * ``splitkv``: SGLang 0.5.15's own ``verify_splitkv_fwd`` (flash-decode over the prefix, then the small causal
      block of step rows, one program per query head), shipped for EAGLE's top-k = 1 chain and enabled upstream
      only on AMD gfx95. Its precondition is ours exactly: pure causal attention over [prefix | step rows], the
      same number of rows per request, no sinks / sliding window / logit cap (it checks those per call and falls
      back otherwise). It cut the step by 26% (C = 32) and 30% (C = 64) against ``prefill``;
    * ``prefill``: leave SGLang's default.

    ``choice`` None reads ``IDLM_ISD_VERIFY_ATTENTION``. A backend without SGLang's split-KV hook (flashinfer, ...)
    keeps its own verify path ("backend").
    """
    choice = choice or os.environ.get(ENV_VERIFY_ATTENTION, "gqa")
    if choice not in VERIFY_ATTENTION:
        raise ValueError(f"{ENV_VERIFY_ATTENTION} must be one of {', '.join(VERIFY_ATTENTION)}, got {choice!r}")
    if choice == "prefill":
        log.info("ISD: verify attention uses the backend's prefill kernel (%s=prefill)", ENV_VERIFY_ATTENTION)
        return "prefill"
    if not (hasattr(backend, "use_verify_splitkv") and callable(getattr(backend, "verify_splitkv_fwd", None))):
        log.info("ISD: attention backend %s has no split-KV verify hook; verify uses its own path",
                 type(backend).__name__)
        return "backend"
    if choice == "gqa":
        backend.verify_splitkv_fwd = gqa_verify_fwd(backend.verify_splitkv_fwd)
    backend.use_verify_splitkv = True
    log.info("ISD: verify attention uses the %s kernel (triton backend)", choice)
    return choice


def gqa_verify_fwd(fallback):
    """A stand-in for SGLang's ``verify_splitkv_fwd`` (same arguments, True when it ran) that runs
    `verify_attention.isd_verify_attention` on ISD's shape and hands every other case to ``fallback``."""

    def run(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
            custom_mask, is_causal, mask_indptr, max_len_extend, k_scale=1.0, v_scale=1.0, sm_scale=None,
            logit_cap=0.0, skip_prefix_custom_mask=True, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
            xai_temperature_len=-1, max_bs=None):
        rows = int(max_len_extend)
        batch = qo_indptr.shape[0] - 1
        plain = (is_causal and sinks is None and (sliding_window_size is None or sliding_window_size <= 0)
                 and not (logit_cap and logit_cap > 0) and not (xai_temperature_len and xai_temperature_len > 0)
                 and float(k_scale) == 1.0 and float(v_scale) == 1.0 and q_extend.dim() == 3
                 and q_extend.shape[0] == batch * rows and q_extend.shape[2] == k_buffer.shape[2]
                 and v_extend.shape[2] == q_extend.shape[2] and q_extend.shape[1] % k_extend.shape[1] == 0)
        if not plain:
            return fallback(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr,
                            kv_indices, custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale,
                            sm_scale, logit_cap=logit_cap, skip_prefix_custom_mask=skip_prefix_custom_mask,
                            sliding_window_size=sliding_window_size, sinks=sinks,
                            window_kv_offsets=window_kv_offsets, xai_temperature_len=xai_temperature_len,
                            max_bs=max_bs)
        from .verify_attention import isd_verify_attention

        scale = sm_scale if sm_scale is not None else q_extend.shape[2] ** -0.5
        isd_verify_attention(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, kv_indptr, kv_indices,
                             rows, scale)
        return True

    return run


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
