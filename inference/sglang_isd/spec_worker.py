"""`ISDWorker`: ISD as a single-model speculative worker of SGLang 0.5.15 (spec-V2 schema, overlap scheduling).

SGLang's scheduler drives it like its built-in NGRAM worker (the template: one model, no draft model, drafts that
come from outside the verify forward):

* extend (prefill) batches run the plain target forward; SGLang's sampler draws the first token from the AR
  distribution with the request's settings; the worker records it as the slot's pending token (cold start next);
* decode batches become one ``TARGET_VERIFY`` forward of R = 2N - 1 rows per request,
  ``[pending, drafts, MASK ...]`` at positions ``seq_len ..``, written to the KV slots SGLang reserved past the
  frontier (``eagle_prepare_for_decode`` reserves them, as for NGRAM); attention is plain causal over the committed
  prefix plus the step rows (no custom mask), the shape SGLang captures CUDA graphs for
  (``speculative_num_draft_tokens`` rows per request);
* verification and the next drafts come from `ISDStateTable` (the core `idlm.isd` functions); the result carries
  ``accept_lens`` and ``new_seq_lens``, so the scheduler commits exactly pending + accepted drafts and emits the
  accepted drafts plus the correction/bonus token. Rejected drafts' and MASK rows' KV sits past the frontier and is
  overwritten next step: no KV of a MASK row is ever attended to by a committed token.

Overlap scheduling (SGLang's default) needs nothing from the CPU between steps: a request's drafts and pending token
live in GPU tensors indexed by its req-pool slot, written and read on the forward stream in launch order, and the
committed frontier goes through SGLang's FutureMap (``on_publish(new_seq_lens)``; the scheduler gathers it back into
the next batch's ``seq_lens`` on the GPU). The scheduler reserves KV for two steps ahead (``eagle_prepare_for_decode``)
because the CPU learns accept lengths one step late. A step does no GPU -> CPU sync, greedy or sampled: what the
sampling math would read back from the GPU (top-k width, whether any row uses top-p or is greedy) comes from the
requests' Python parameters (`_sampling_hints`), and one draft mode serves the whole batch.

Sampling settings come from each request (``batch.sampling_info``). Not applied by ISD: penalties, min_p, logit
bias, grammars, logprobs (the worker warns once when a batch asks for them).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType
from sglang.srt.speculative.spec_utils import record_stream_for_v2_verify
from sglang.srt.speculative.triton_ops.cache_locs import assign_extend_cache_locs_func

from idlm.lora import GatedLoRAConfig
from idlm.requests import is_greedy
from idlm.sampling import BatchHints

from .compat import select_verify_attention
from .config import ISDServeConfig, mask_token_id_of
from .profiler import StepProfiler
from .stepper import ISDStateTable, SamplingView

log = logging.getLogger(__name__)


class ISDVerifyInput(SpecInput):
    """What SGLang reads of ISD's spec input: in a verify forward (the attention backend and the CUDA-graph runner)
    and, as ``next_draft_input``, between steps (the overlap scheduler's FutureMap relay).

    ``custom_mask`` is None: the backends then run causal attention over [prefix | step rows], which is ISD's mask.
    The per-request ISD state lives in the worker's `ISDStateTable`, indexed by req-pool slot; between steps this
    object carries only what SGLang's overlap path relays: ``future_indices`` (set by the scheduler; the slots whose
    published ``new_seq_lens`` the next batch gathers) and ``bonus_tokens`` (the pending token of each request, which
    the FutureMap stashes; ISD reads its own copy). Filtering and merging keep those two aligned with the batch.
    """

    def __init__(self, draft_token_num: int, positions: torch.Tensor | None = None,
                 draft_token: torch.Tensor | None = None, bonus_tokens: torch.Tensor | None = None):
        # NGRAM_VERIFY: a verify input of a single-model algorithm without hidden-state capture (the backends treat
        # it generically; only flashinfer special-cases DFLASH_VERIFY).
        super().__init__(SpecInputType.NGRAM_VERIFY)
        self.draft_token_num = draft_token_num
        self.positions = positions
        self.draft_token = draft_token
        self.custom_mask = None
        self.capture_hidden_mode = CaptureHiddenMode.NULL
        self.future_indices: torch.Tensor | None = None
        self.grammar = None
        # the FutureMap relay reads these as attributes (RelayPayload.from_draft_input); ISD has no top-k tree and no
        # draft hidden states
        self.bonus_tokens = bonus_tokens
        self.topk_p = self.topk_index = self.hidden_states = None

    def get_spec_adjust_token_coefficient(self) -> tuple[int, int]:
        return self.draft_token_num, self.draft_token_num

    def generate_attn_arg_prefill(self, req_pool_indices: torch.Tensor, paged_kernel_lens: torch.Tensor,
                                  paged_kernel_lens_sum: int, req_to_token: torch.Tensor):
        """The flashinfer backend's verify plan (``FlashInferIndicesUpdaterPrefill.call_begin_forward``).

        req_pool_indices: [B] slots; paged_kernel_lens: [B] committed lengths (their sum, host-known:
        ``paged_kernel_lens_sum``); req_to_token: [slots, max_len] KV locations, this step's R =
        ``draft_token_num`` rows already written after each prefix. Returns (kv_indices [sum + B R], kv_indptr [B + 1],
        qo_indptr [B + 1], custom_mask None): each request's KV is its prefix plus its R step rows, its queries are
        the R rows, and without a custom mask flashinfer's causal mode aligns queries to the end of the KV, which is
        ISD's attention rule (causal over [prefix | step rows]). Sizes come from the host, so nothing syncs.
        """
        r, dev = self.draft_token_num, req_pool_indices.device
        bs = req_pool_indices.shape[0]
        kv_lens = paged_kernel_lens.to(torch.int32) + r
        kv_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
        kv_indptr[1:] = torch.cumsum(kv_lens, 0)
        qo_indptr = torch.arange(bs + 1, dtype=torch.int32, device=dev) * r
        flat = torch.arange(int(paged_kernel_lens_sum) + r * bs, device=dev)  # one entry per KV position
        owner = torch.searchsorted(kv_indptr[1:].to(torch.int64), flat, right=True)
        column = flat - kv_indptr[owner].to(torch.int64)
        kv_indices = req_to_token[req_pool_indices.to(torch.int64)[owner], column].to(torch.int32)
        return kv_indices, kv_indptr, qo_indptr, None

    def filter_batch(self, new_indices: torch.Tensor, has_been_filtered: bool = True) -> None:
        if self.future_indices is not None:
            self.future_indices = self.future_indices[new_indices]
        if self.bonus_tokens is not None:
            self.bonus_tokens = self.bonus_tokens[new_indices]

    def merge_batch(self, spec_info: ISDVerifyInput) -> None:
        for name in ("future_indices", "bonus_tokens"):
            mine, theirs = getattr(self, name), getattr(spec_info, name, None)
            if mine is None and theirs is None:
                continue
            if mine is None or theirs is None:
                raise RuntimeError(f"ISD: merging batches of which only one carries {name} (overlap relay state)")
            setattr(self, name, torch.cat([mine, theirs]))


class _NoDraftModel:
    """The draft side of a worker without a draft model, as SGLang's scheduler reads it.

    ``kv_cache_builder.get_draft_kv_pool`` reads ``spec_worker.draft_worker.draft_runner.token_to_kv_pool`` for every
    algorithm but NGRAM; None there means "no draft KV pool" (disaggregation and HiCache then skip it).
    """

    def __init__(self) -> None:
        self.draft_runner = SimpleNamespace(token_to_kv_pool=None)


class ISDWorker(BaseSpecWorker):
    """The worker SGLang's scheduler builds from ``--speculative-algorithm ISD`` (see `plugin.register`)."""

    def __init__(self, server_args, gpu_id: int, tp_rank: int, dp_rank: int | None, moe_ep_rank: int,
                 attn_cp_rank: int, moe_dp_rank: int, nccl_port: int, target_worker):
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.rows = int(server_args.speculative_num_draft_tokens)
        stride = ISDServeConfig.stride_from_num_draft_tokens(self.rows)
        self.cfg = ISDServeConfig.from_env(stride=stride)
        self.vocab_size = self.model_runner.model_config.vocab_size
        if self.cfg.lora:  # R-ISD: a base model plus a gated LoRA on the MASK rows
            meta = GatedLoRAConfig.load(self.cfg.lora)
            if meta.stride != stride:
                log.warning("R-ISD: the adapter was trained for stride %d, served with stride %d", meta.stride, stride)
            self.mask_token_id = meta.mask_token_id
        else:
            self.mask_token_id = mask_token_id_of(self.model_runner.model_config.hf_config, server_args.model_path)
        if not 0 <= self.mask_token_id < self.vocab_size:
            source = "the adapter's" if self.cfg.lora else "the checkpoint's"
            raise RuntimeError(f"ISD: {source} MASK id {self.mask_token_id} is outside the served model's vocabulary "
                               f"({self.vocab_size})")
        if self.cfg.lora:
            from .gated_lora import install_gated_lora

            # the model is loaded and no CUDA graph is captured yet: wrap its projections now
            install_gated_lora(self.model_runner.model, self.cfg.lora, self.mask_token_id,
                               dtype=self.model_runner.dtype, device=self.device)
        self.state: ISDStateTable | None = None  # built in alloc_memory_pool, once the req pool exists
        self._warned: set[str] = set()
        self._no_draft = _NoDraftModel()
        self.verify_attention = "prefill"  # chosen in init_attention_backends
        self.profiler = StepProfiler.from_env()
        log.info("ISD worker: stride %d (%d rows per request per step), mask id %d, draft mode %s",
                 stride, self.rows, self.mask_token_id, self.cfg.draft_mode)

    # -- BaseSpecWorker -------------------------------------------------------------------------------------------

    @property
    def target_worker(self):
        return self._target_worker

    @property
    def draft_worker(self) -> _NoDraftModel:
        return self._no_draft  # no draft model: the MASK rows of the verify forward draft

    def alloc_memory_pool(self, **kwargs) -> None:
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
        size = self.req_to_token_pool.req_to_token.shape[0]
        self.state = ISDStateTable(size, self.cfg, self.mask_token_id, self.device, vocab_size=self.vocab_size)

    def clear_cache_pool(self) -> None:
        if self.state is not None:
            self.state.num_drafts.zero_()

    def init_attention_backends(self) -> None:
        """Runs after the target's attention backend exists and before CUDA graphs are captured: choose the triton
        backend's TARGET_VERIFY attention kernel (`compat.select_verify_attention`)."""
        self.verify_attention = select_verify_attention(self.model_runner.attn_backend)

    def update_weights_from_tensor(self, recv_req):
        return self.target_worker.update_weights_from_tensor(recv_req)

    # -- one scheduler iteration ----------------------------------------------------------------------------------

    def forward_batch_generation(self, batch: ScheduleBatch, on_publish=None) -> GenerationBatchResult:
        if batch.forward_mode.is_decode():
            return self._decode(batch, on_publish)
        return self._extend(batch, on_publish)

    def _extend(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        """Prefill (or idle): the plain target forward; its sampled token becomes the pending token."""
        result = self.target_worker.forward_batch_generation(batch)
        bs = len(batch.reqs)
        predict = result.next_token_ids
        new_seq_lens = batch.seq_lens.clone()
        if bs and not batch.forward_mode.is_idle():
            self.state.on_prefill(batch.req_pool_indices, predict)
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=result.logits_output,
            next_token_ids=predict,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=ISDVerifyInput(self.rows, bonus_tokens=predict),
            speculative_num_draft_tokens=self.rows,
        )

    def _decode(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        """One ISD step: a TARGET_VERIFY forward of 2N - 1 rows per request, verification, next drafts."""
        bs = len(batch.reqs)
        # the batch's seq_lens / req_pool_indices may come from the scheduler's stream (overlap): keep their memory
        # until this stream is done with them
        record_stream_for_v2_verify(batch, None, torch.cuda.current_stream())
        self._warn_unsupported(batch)
        prof = self.profiler
        t_start = prof.now() if prof else 0.0
        step = self.state.build(batch.req_pool_indices, batch.seq_lens)
        input_ids = step.input_ids.reshape(-1)
        positions = step.position_ids.reshape(-1)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = input_ids
        batch.out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens,
            end_offset=batch.seq_lens + self.rows,
            batch_size=bs,
            draft_token_num=self.rows,
            device=self.device,
        )
        batch.spec_info = ISDVerifyInput(self.rows, positions=positions, draft_token=input_ids)
        marks = [prof.now()] if prof else []
        result = self.target_worker.forward_batch_generation(batch, is_verify=True)
        if prof:
            marks.append(prof.now())
        logits = result.logits_output.next_token_logits
        if logits is None or logits.shape[0] != bs * self.rows:
            got = None if logits is None else tuple(logits.shape)
            raise RuntimeError(f"ISD: the verify forward returned logits of shape {got}, expected "
                               f"({bs * self.rows}, vocab): SGLang's TARGET_VERIFY logits contract changed")
        info = batch.sampling_info
        sampling = None
        if not info.is_all_greedy:
            sampling = SamplingView(info.temperatures.view(-1), info.top_ks.view(-1), info.top_ps.view(-1),
                                    hints=self._sampling_hints(batch))
        out = self.state.commit(batch.req_pool_indices, step, logits[:, :self.vocab_size], batch.seq_lens, sampling)
        if prof:
            marks.append(prof.now())
            prof.record(bs, t_start, marks, bool(result.can_run_cuda_graph))
        if on_publish is not None:
            on_publish(out.new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE
        # nothing reads the [B * R, V] logits after commit (ISD returns no logprobs); the scheduler keeps the result
        # for up to two iterations under overlap, so drop the reference now
        result.logits_output.next_token_logits = None
        return GenerationBatchResult(
            logits_output=result.logits_output,
            next_token_ids=out.next_token_ids,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=out.accept_lens,
            new_seq_lens=out.new_seq_lens,
            next_draft_input=ISDVerifyInput(self.rows, bonus_tokens=out.pending),
            speculative_num_draft_tokens=self.rows,
        )

    def _sampling_hints(self, batch: ScheduleBatch) -> BatchHints:
        """What `process_logits` would otherwise read back from the GPU, from the requests' own Python sampling
        parameters (the rows of ``batch.sampling_info``, in the same order): no device sync inside the step."""
        params = [r.sampling_params for r in batch.reqs]
        greedy = [is_greedy(sp.temperature, sp.top_k) for sp in params]
        return BatchHints.of([0.0 if g else sp.temperature for g, sp in zip(greedy, params)],
                             [sp.top_k for sp in params], [sp.top_p for sp in params], self.vocab_size)

    def _warn_unsupported(self, batch: ScheduleBatch) -> None:
        info = batch.sampling_info
        checks = {
            "penalties": info.penalizer_orchestrator is not None and info.penalizer_orchestrator.is_required,
            "min_p": bool(getattr(info, "need_min_p_sampling", False)),
            "logit_bias/vocab masks": getattr(info, "logit_bias", None) is not None or info.vocab_mask is not None,
            "grammars": bool(batch.has_grammar),
            "logprobs": bool(batch.return_logprob),
        }
        for name, on in checks.items():
            if on and name not in self._warned:
                self._warned.add(name)
                log.warning("ISD ignores %s (requested by a request in this batch); tokens follow temperature, "
                            "top_k and top_p only", name)
