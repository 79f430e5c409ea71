"""Every patch of SGLang internals, in one file; each one is pinned to SGLang 0.5.15 by
tests/test_sglang_compat.py::test_sglang_internals_pinned, which fails when the source it relies on moves.

1. `install_dllm_spelling`: the paper's ``--dllm-algorithm IDLMBlockN`` spelling. SGLang's dLLM registry is a
   pkgutil scan of its own package and the dLLM runtime cannot keep a verified prefix's KV (docs/serving.md), so
   ISD is not a dLLM algorithm here. A BEFORE hook on ``ServerArgs.__post_init__`` (SGLang's own plugin
   `HookRegistry`) rewrites ``--dllm-algorithm IDLMBlockN --dllm-algorithm-config Y`` into ``--speculative-algorithm
   ISD`` before SGLang resolves its arguments (`config.translate_dllm_args`). Relies on the name
   ``ServerArgs.__post_init__`` and the fields in `PATCHED_FIELDS`.
2. `select_verify_attention`: the triton attention backend's TARGET_VERIFY kernel. It sets the backend instance's
   ``use_verify_splitkv`` flag and, for ``gqa``, replaces its ``verify_splitkv_fwd`` with `gqa_verify_fwd`, which
   takes that function's arguments. Relies on those two attributes, the call that reads them and the signature.

3. `install_capture_spec_info`: the verify input of a CUDA-graph capture on the flashinfer backend. SGLang's
   ``DecodeCudaGraphRunner.get_spec_info`` builds one only for its own algorithms and hands None to the backend
   otherwise; flashinfer's verify plan then stops (``call_begin_forward``: ``assert prefix_lens is not None``). An
   AFTER hook (SGLang's `HookRegistry`) returns ISD's `ISDVerifyInput` there, for ISD on flashinfer only (the triton
   backend reads nothing from it). Relies on that method, the runner's ``num_tokens_per_bs`` and ``model_runner``,
   and flashinfer calling ``spec_info.generate_attn_arg_prefill``.

4. `install_finish_as_ar`: where a step of several tokens ends a request. SGLang's
   ``Req.update_finish_state(new_accepted_len)`` checks the whole run at once, in an order that is AR's only for
   one token: the length cap first (a length finish keeps ``output_ids[:max_new_tokens]``, so a run crossing the
   cap with a stop token or stop string before it ran on past the stop), and stop strings before stop tokens (a
   stop string completed after a stop token in the same run won, with the tokens between). Every speculative
   algorithm of SGLang 0.5.15 has this. An AROUND hook runs SGLang's own check token by token in those two cases
   (a run that reaches the cap; a request with stop strings or regexes), on the output as AR would have held it,
   and stops at the first finish; every other step goes to SGLang's check unchanged (its scan for the first stop
   token is AR's rule). Relies on the method's name and signature, a one-token call being AR's check,
   ``finished()``, ``to_finish``, ``finished_len``, and the check changing ``output_ids`` only in place.

Nothing here imports SGLang at module level (the patches are tested on CPU with stand-ins and, where the SGLang
source is at hand, with SGLang's own hook registry).
"""

from __future__ import annotations

import logging
import os

from .config import ALGORITHM_NAME, SGLANG_VERSION, translate_dllm_args

log = logging.getLogger(__name__)

HOOK_TARGET = "sglang.srt.server_args.ServerArgs.__post_init__"
PATCHED_FIELDS = ("dllm_algorithm", "dllm_algorithm_config", "speculative_algorithm", "speculative_num_draft_tokens")

VERIFY_ATTENTION = ("gqa", "splitkv", "prefill")
ENV_VERIFY_ATTENTION = "IDLM_ISD_VERIFY_ATTENTION"


def check_sglang_version() -> None:
    """Warn (loudly) when the installed SGLang is not the version this integration was written against."""
    from importlib.metadata import version

    installed = version("sglang")
    if installed != SGLANG_VERSION:
        log.warning("idlm ISD plugin was written for sglang==%s but %s is installed: the spec-worker interface and "
                    "the patches of inference/sglang_isd/compat.py may not work", SGLANG_VERSION, installed)


# ------------------------------------------------------------------------------------------- 1. the paper's spelling
def _before_post_init(self, *args, **kwargs):
    translate_dllm_args(self)
    return None  # keep the original arguments


def install_dllm_spelling() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGET, _before_post_init, HookType.BEFORE)


# ---------------------------------------------------------------------------------------- 3. capture verify input
CAPTURE_HOOK_TARGET = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.get_spec_info"
FLASHINFER_BACKEND = "FlashInferAttnBackend"


def _capture_spec_info(result, runner, *args, **kwargs):
    """AFTER hook on ``DecodeCudaGraphRunner.get_spec_info(self, num_tokens)``: None keeps SGLang's result."""
    model_runner = runner.model_runner
    if result is not None or getattr(model_runner, "is_draft_worker", False):
        return None
    if getattr(model_runner.spec_algorithm, "name", None) != ALGORITHM_NAME:
        return None
    if type(getattr(model_runner, "attn_backend", None)).__name__ != FLASHINFER_BACKEND:
        return None  # triton's capture path is ISD's tested one and reads nothing from a verify input
    from .spec_worker import ISDVerifyInput

    return ISDVerifyInput(draft_token_num=runner.num_tokens_per_bs)


def install_capture_spec_info() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CAPTURE_HOOK_TARGET, _capture_spec_info, HookType.AFTER)


# ---------------------------------------------------------------------------------------- 2. verify attention kernel
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


# ------------------------------------------------------------------- 4. where a multi-token step ends a request
FINISH_HOOK_TARGET = "sglang.srt.managers.schedule_batch.Req.update_finish_state"


def needs_token_by_token_check(req, new_accepted_len: int) -> bool:
    """Whether SGLang's one-pass finish check of a step that committed ``new_accepted_len`` tokens may end ``req``
    elsewhere than AR decoding would: when the run reached ``max_new_tokens`` (SGLang checks the cap first and
    keeps ``output_ids[:max_new_tokens]``, past any stop before it) or when the request has stop strings or
    regexes (SGLang checks them over the whole run before stop tokens, so a stop string completed after a stop
    token wins). Otherwise its scan for the first stop token is AR's rule."""
    if new_accepted_len <= 1:
        return False
    sp = req.sampling_params
    cap = sp.max_new_tokens
    if cap is not None and len(req.output_ids) >= cap:
        return True
    return bool(getattr(sp, "stop_strs", None) or getattr(sp, "stop_regex_strs", None))


def _finish_as_ar(original, req, new_accepted_len: int = 1):
    """AROUND hook on ``Req.update_finish_state(self, new_accepted_len=1)``: where SGLang's check of a multi-token
    step could differ from AR's (`needs_token_by_token_check`), run SGLang's own check once per new token, on
    ``output_ids`` as AR would have held it after that token, and stop at the first finish. The finish (length,
    stop string or regex, stop token, an out-of-vocabulary id) is then the one AR decoding would have reached, at
    the same token; ``finished_len`` marks it, so the tokens after it are not returned."""
    if req.finished() or req.to_finish is not None or not needs_token_by_token_check(req, new_accepted_len):
        return original(req, new_accepted_len)
    # the run is taken off the same list and put back token by token (SGLang's check may rewrite a token in place,
    # an out-of-vocabulary id; it never replaces the list), so each check sees the output AR would have held
    out = req.output_ids
    start = len(out) - new_accepted_len
    run = out[start:]
    del out[start:]
    try:
        for token in run:
            out.append(token)
            original(req, 1)
            if req.finished():
                if req.finished_len is None:  # a stop string seen in the decoded text: AR ended at this token
                    req.finished_len = len(out)
                return None
    finally:
        out.extend(run[len(out) - start:])
    return None


def install_finish_as_ar() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(FINISH_HOOK_TARGET, _finish_as_ar, HookType.AROUND)
