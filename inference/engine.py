"""A small reference ISD engine: batched requests, a trimmed KV cache, per-request sampling; CPU or GPU.

It drives a stock transformers causal LM (plus, for R-ISD, a gated LoRA from `idlm.lora`) with the
step math of `idlm.isd`. Each `ISDEngine.step` prefills newly admitted requests and runs one batched decode
forward for every running request. The engine is meant to be owned by one thread (the server's worker).

KV layout (`PaddedKVCache`): per layer one key and one value buffer [B, H, C, D] (C = capacity); request b's cached
tokens are rows [0, lengths[b]) and the rest is padding. A forward writes its R step rows at [T, T + R) with
T = max(lengths) and reads them under an explicit 4D mask (padding keys hidden, causal among step rows) with explicit
position ids; afterwards the kept rows (pending + accepted drafts) move to [lengths[b], lengths[b] + keep[b]), so
between steps the cache holds exactly the committed tokens of every request.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from idlm.adaptive import AdaptiveStride, StepCostTable
from idlm.checkpoint import idlm_config_of, load_causal_lm
from idlm.config import decode_stride_problem
from idlm.errors import UserError
from idlm.isd import (
    ISDStats,
    build_step,
    check_draft_mode,
    gather_rows,
    max_step_rows,
    next_num_drafts,
    propose_drafts,
    rows_to_keep,
    step_tokens,
    verify_drafts,
    verify_greedy,
)
from idlm.lora import GatedLoRAConfig, load_gated_lora
from idlm.requests import (
    DEFAULT_DRAFT_MODE,
    check_draft_temperature,
    check_max_new_tokens,
    check_seed,
    check_temperature,
    check_top_k,
    check_top_p,
    is_greedy,
)
from idlm.sampling import process_logits, sample_from_probs

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    """Per-request decoding settings.

    stop_token_ids: generation stops right after one of these is emitted (it is included in ``token_ids``).
    seed: seeds this request's own generator (None: a random seed); results do not depend on the batch.
    draft_mode: ``"sample"`` | ``"argmax"`` | ``"paper_argmax"`` (biased, for tests only), see `idlm.isd`.
    draft_temperature: sampled drafts come from the draft rows at ``temperature * draft_temperature`` (top-k and
        top-p as the request's); the verifier uses that same distribution, so every value is exact. Below 1 the
        drafts are sharper than the model's own marginal, which can accept more (`idlm.ceiling`).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    draft_mode: str = DEFAULT_DRAFT_MODE["native"]
    draft_temperature: float = 1.0


@dataclass
class RequestOutput:
    """What one request did in one `ISDEngine.step` (and in total so far). See `idlm.isd.ISDStats` for tpf."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None
    prompt_tokens: int
    forwards: int
    tpf: float
    acceptance: list[float]
    error: str | None = None  # with finish_reason "error": why this request failed in a step (the others went on)


def pooled_tpf(outputs: list[RequestOutput]) -> float:
    """TPF over several requests: tokens emitted by decode forwards / decode forwards, pooled (each request's tpf
    weighted by its forwards; the prefill token counts nowhere). 0.0 without decode forwards."""
    forwards = sum(o.forwards for o in outputs)
    return sum(o.tpf * o.forwards for o in outputs) / forwards if forwards else 0.0


def mean_acceptance(outputs: list[RequestOutput], stride: int) -> list[float]:
    """Acceptance per draft position 1..N-1, the mean over requests of each request's rate ([] for stride 1)."""
    return [sum(o.acceptance[k] for o in outputs) / len(outputs) for k in range(stride - 1)]


# ----------------------------------------------------------------------------------------------------------------
# KV cache


class PaddedKVCache:
    """Right-padded per-layer KV buffers of a batch of requests, with per-request valid lengths.

    keys[l], values[l]: [B, H, C, D]; lengths: [B] python ints; ``width`` = max(lengths) = T.
    Buffers are allocated lazily by the first forward (shapes come from the model's attention layers).
    """

    def __init__(self, lengths: list[int], device: torch.device):
        self.lengths = list(lengths)
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = 0  # R of the forward in flight

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    # -- during a forward ------------------------------------------------------------------------------------------

    def hf_cache(self, num_rows: int, num_layers: int):
        """A transformers `Cache` whose layers write this forward's ``num_rows`` rows into our buffers."""
        self._rows = num_rows
        return Cache(layers=[_BufferLayer(self, i) for i in range(num_layers)])

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step rows key/value [B, H, R, D] at [T, T + R) and return the keys/values [B, H, T + R, D]."""
        t, r = self.width, key.shape[2]
        while len(self.keys) <= layer:  # first forward: layers arrive in order
            shape = (key.shape[0], key.shape[1], 0, key.shape[3])
            self.keys.append(key.new_zeros(shape))
            self.values.append(value.new_zeros(shape))
        if self.keys[layer].shape[2] < t + r:
            self._grow(layer, t + r)
        self.keys[layer][:, :, t:t + r] = key
        self.values[layer][:, :, t:t + r] = value
        return self.keys[layer][:, :, :t + r], self.values[layer][:, :, :t + r]

    def _grow(self, layer: int, need: int) -> None:
        cap = max(need, 2 * self.keys[layer].shape[2], 64)
        for buf in (self.keys, self.values):
            old = buf[layer]
            new = old.new_zeros(old.shape[:2] + (cap,) + old.shape[3:])
            new[:, :, :old.shape[2]] = old
            buf[layer] = new

    def attention_mask(self, num_rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[B, 1, R, T + R]: True (or 0.0 when ``dtype`` is a float type) where a step row may attend: the request's
        valid cached keys and the step rows up to itself."""
        t = self.width
        lengths = torch.tensor(self.lengths, device=self.device)
        past = torch.arange(t, device=self.device) < lengths[:, None]  # [B, T]
        causal = torch.ones(num_rows, num_rows, dtype=torch.bool, device=self.device).tril()
        mask = torch.cat([past[:, None, :].expand(-1, num_rows, -1),
                          causal.expand(len(self.lengths), -1, -1)], dim=-1)[:, None]
        if dtype is None or dtype == torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)

    def commit(self, keep: list[int]) -> None:
        """After a forward: keep the first ``keep[b]`` step rows of request b right after its cached tokens."""
        t, r = self.width, self._rows
        if any(n > r for n in keep):
            raise ValueError(f"cannot keep more than the {r} step rows")
        if any(n != t for n in self.lengths):
            # Move all R step rows to lengths[b] + i; the rows past keep[b] land beyond the new length (padding).
            dest = torch.tensor(self.lengths, device=self.device)[:, None] + torch.arange(r, device=self.device)
            for buf in (self.keys, self.values):
                for x in buf:
                    rows = x[:, :, t:t + r].clone()
                    idx = dest[:, None, :, None].expand(rows.shape)
                    x.scatter_(2, idx, rows)
        self.lengths = [n + k for n, k in zip(self.lengths, keep)]
        self._rows = 0

    # -- batch membership -------------------------------------------------------------------------------------------

    def select(self, indices: list[int]) -> None:
        """Keep only the requests at ``indices`` (in that order)."""
        idx = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.lengths = [self.lengths[i] for i in indices]
        for buf in (self.keys, self.values):
            for i, x in enumerate(buf):
                x = x.index_select(0, idx)
                if x.shape[2] > 2 * self.width + 64:  # give back the room of finished long requests
                    x = x[:, :, :self.width + 64].clone()
                buf[i] = x

    def extend(self, other: PaddedKVCache) -> None:
        """Append the requests of ``other`` (same model) after ours."""
        if not self.keys:
            self.keys, self.values = other.keys, other.values
        elif other.keys:
            for buf, obuf in ((self.keys, other.keys), (self.values, other.values)):
                for i in range(len(buf)):
                    a, b = buf[i], obuf[i]
                    cap = max(a.shape[2], b.shape[2])
                    buf[i] = torch.cat([_pad_to(a, cap), _pad_to(b, cap)], 0)
        self.lengths = self.lengths + other.lengths

    def subset(self, index: int) -> PaddedKVCache:
        """A new cache holding a copy of request ``index`` alone."""
        out = PaddedKVCache([self.lengths[index]], self.device)
        out.keys = [k[index:index + 1].clone() for k in self.keys]
        out.values = [v[index:index + 1].clone() for v in self.values]
        return out

    def request_kv(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The valid cache of request ``index``: per layer (keys, values) of shape [H, lengths[index], D]."""
        n = self.lengths[index]
        return [(k[index, :, :n].clone(), v[index, :, :n].clone()) for k, v in zip(self.keys, self.values)]


def _pad_to(x: torch.Tensor, cap: int) -> torch.Tensor:
    if x.shape[2] == cap:
        return x
    out = x.new_zeros(x.shape[:2] + (cap,) + x.shape[3:])
    out[:, :, :x.shape[2]] = x
    return out


class _BufferLayer(DynamicLayer):
    """One layer of the transformers Cache protocol, backed by a `PaddedKVCache` buffer (no copies of the past).

    It derives from the concrete DynamicLayer (not the abstract mixin) so that abstract methods added by later
    transformers versions (5.17 added ``get_max_length``) keep a default; tested on 5.6 (CPU) and 5.17 (CUDA).
    """

    def __init__(self, store: PaddedKVCache, layer: int):
        super().__init__()
        self.store, self.layer = store, layer

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = self.store.write(self.layer, key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.width


# ----------------------------------------------------------------------------------------------------------------
# Requests


@dataclass(eq=False)  # identity: requests are looked up in lists
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests: they draw no randomness
    stats: ISDStats
    token_ids: list[int] = field(default_factory=list)
    new_token_ids: list[int] = field(default_factory=list)
    pending: int = -1
    drafts: list[int] = field(default_factory=list)
    q_probs: torch.Tensor | None = None  # [N - 1, V] processed draft distributions (ratio-rule modes only)
    num_drafts: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def greedy(self) -> bool:
        return bool(is_greedy(self.params.temperature, self.params.top_k))

    @property
    def verify_mode(self) -> str:
        # With temperature 0, p and q are one-hot and the "argmax" rule is exact greedy verification (needs no q).
        return "argmax" if self.greedy else self.params.draft_mode

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            new_token_ids=list(self.new_token_ids),
            token_ids=list(self.token_ids),
            finished=self.finish_reason is not None,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            forwards=self.stats.forwards,
            tpf=self.stats.tpf,
            acceptance=self.stats.acceptance,
            error=self.error,
        )

    def fail(self, exc: Exception) -> None:
        """End this request because a step failed on it alone."""
        self.finish_reason = "error"
        self.error = f"{type(exc).__name__}: {exc}"

    def emit(self, tokens: list[int]) -> int:
        """Append tokens until a stop token or the length limit; returns how many were appended."""
        n = 0
        for tok in tokens:
            if len(self.token_ids) >= self.params.max_new_tokens:
                break
            self.token_ids.append(tok)
            self.new_token_ids.append(tok)
            n += 1
            if tok in self.params.stop_token_ids:
                self.finish_reason = "stop"
                return n
        if len(self.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return n

    def uniforms(self, count: int) -> torch.Tensor:
        """``count`` uniforms in [0, 1) from this request's generator (zeros for greedy requests)."""
        if self.generator is None:
            return torch.zeros(count, dtype=torch.float64)
        return torch.rand(count, generator=self.generator, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Engine


class ISDEngine:
    """Reference engine for Introspective Strided Decoding.

    model: a transformers causal LM with full (non-sliding) attention, attn_implementation "sdpa" or "eager".
        For R-ISD pass the base model with a gated LoRA attached by `idlm.lora.load_gated_lora`.
    stride: N (1 = plain AR decoding through the same code). mask_token_id: the MASK input id (needed for N > 1).
    stride_policy: load-adaptive stride (`idlm.adaptive.AdaptiveStride`): each decode step runs at the N it chooses
        for the batch, at most ``stride``; outputs keep their distribution (greedy ones stay the AR output).
    max_context: positions the model supports (default: config.max_position_embeddings).
    device: moves the model there (default: leave it where it is). The model is put in eval mode.
    """

    def __init__(
        self,
        model,
        tokenizer,
        stride: int,
        mask_token_id: int | None,
        max_batch_size: int = 16,
        max_context: int | None = None,
        device=None,
        stride_policy: AdaptiveStride | None = None,
    ):
        if decode_stride_problem(stride):
            raise ValueError(decode_stride_problem(stride))
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        config = model.config
        rows = model.get_input_embeddings().weight.shape[0]
        if stride > 1:
            if mask_token_id is None:
                raise ValueError("stride > 1 needs a mask token id (an I-DLM checkpoint or a gated-LoRA adapter)")
            if not 0 <= mask_token_id < rows:
                raise ValueError(f"mask token id {mask_token_id} is not an embedding row (the model has {rows})")
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"} or getattr(config, "use_sliding_window", False):
            raise ValueError(f"the reference engine supports full attention only, got layer types {sorted(types)}")
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"the reference engine needs attn_implementation 'sdpa' or 'eager', got {attn!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.stride = stride
        if stride_policy is not None and stride_policy.max_stride != stride:
            raise ValueError(f"the stride policy's max_stride {stride_policy.max_stride} is not the engine's {stride}")
        self.stride_policy = stride_policy
        self.mask_token_id = mask_token_id
        self.max_batch_size = max_batch_size
        self.max_context = int(max_context or getattr(config, "max_position_embeddings", None) or 1 << 30)
        self.vocab_rows = rows
        if device is not None:
            model.to(device)
        model.eval()  # dropout would break exactness
        self.device = next(model.parameters()).device
        self._mask_dtype = None if attn == "sdpa" else model.dtype
        self._num_layers = config.get_text_config().num_hidden_layers
        self._gate = getattr(model, "idlm_lora_gate", None)  # set by idlm.lora for R-ISD
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cache = PaddedKVCache([], self.device)
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestOutput] = []

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        stride: int | None = None,
        lora: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 16,
    ) -> ISDEngine:
        """Load an I-DLM checkpoint (stride defaults to its ``idlm`` block), or a plain AR model with ``stride=1``,
        or (``lora``) a base AR model plus a gated-LoRA adapter directory for R-ISD (mask id and stride from the
        adapter). Raises `idlm.errors.UserError` for unusable paths."""
        if stride is not None and decode_stride_problem(stride):
            raise UserError(decode_stride_problem(stride))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if lora is not None:
            GatedLoRAConfig.load(lora)  # a bad adapter path fails before the (slow) model load
            model, tokenizer = load_causal_lm(path, dtype=dtype, device=device, attn_implementation="sdpa")
            model, meta = load_gated_lora(model, lora)
            mask_id, default_stride = meta.mask_token_id, meta.stride
        else:
            cfg = idlm_config_of(path)
            if cfg is None and stride != 1:
                raise UserError(f"{path} is not an I-DLM checkpoint (no 'idlm' block in config.json): convert it with "
                                "`idlm convert`, add a gated-LoRA adapter (--lora), or decode plain AR with stride 1")
            model, tokenizer = load_causal_lm(path, dtype=dtype, device=device, attn_implementation="sdpa")
            mask_id = cfg.mask_token_id if cfg else None
            default_stride = cfg.stride if cfg else 1
        try:
            return cls(model, tokenizer, stride or default_stride, mask_id, max_batch_size=max_batch_size,
                       device=device)
        except ValueError as exc:
            raise UserError(str(exc)) from exc

    # -- requests ---------------------------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; it is prefilled by the next `step` that has room. Returns its id."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_rows]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_rows - 1})")
        # the shared rules (idlm.requests); InvalidRequest is a ValueError
        check_max_new_tokens(params.max_new_tokens)
        check_temperature(params.temperature)
        check_top_k(params.top_k)
        check_top_p(params.top_p)
        check_seed(params.seed)
        check_draft_mode(params.draft_mode)
        check_draft_temperature(params.draft_temperature)
        # A step writes up to 2N - 1 rows after the committed tokens; the last one may reach this far.
        slack = max_step_rows(self.stride) - 1
        need = len(prompt_ids) + params.max_new_tokens + slack
        if need > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) + {slack} step rows "
                f"= {need} exceeds the model's context of {self.max_context} positions"
            )
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = None
        if not is_greedy(params.temperature, params.top_k):
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator().manual_seed(seed)
        req = _Request(request_id, prompt_ids, params, generator, ISDStats(self.stride))
        self._requests[request_id] = req
        self._waiting.append(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Drop a request; the next `step` reports it once with finish_reason "abort". Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        if req in self._waiting:
            self._waiting.remove(req)
        elif req in self._running:  # (neither: it was being admitted when a failed step raised)
            idx = self._running.index(req)
            self._running.pop(idx)
            self._cache.select([i for i in range(len(self._running) + 1) if i != idx])
        req.finish_reason = "abort"
        req.new_token_ids = []
        self._aborted.append(req.output())

    def has_unfinished(self) -> bool:
        """True while requests wait or run, or an abort is still to be reported."""
        return bool(self._waiting or self._running or self._aborted)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Prefill newly admitted requests, then one batched ISD decode forward for every running request.

        Returns an output for every request that emitted tokens or finished (aborts included) in this step.
        """
        outputs = self._aborted
        self._aborted = []
        admitted: list[_Request] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            admitted.append(self._waiting.popleft())
        touched: list[_Request] = []
        if admitted:
            touched += self._prefill_guarded(admitted)
        if self._running:
            seen = {id(r) for r in touched}
            touched += [r for r in self._decode_guarded() if id(r) not in seen]
        for req in touched:
            outputs.append(req.output())
            req.new_token_ids = []
            if req.finish_reason is not None:
                self._requests.pop(req.request_id, None)
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Run ``prompts`` to completion (other queued requests progress too); final outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} sampling params for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for prompt, sp in zip(prompts, plist):
                ids.append(self.add_request(prompt, sp))
        except ValueError:
            for rid in ids:  # all or nothing: drop the ones already queued, without abort reports
                self._waiting.remove(self._requests.pop(rid))
            raise
        wanted, final = set(ids), {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    # -- inspection (tests, debugging) -----------------------------------------------------------------------------

    def cached_tokens(self, request_id: str) -> list[int]:
        """The token ids whose KV the cache holds for a running request: prompt + emitted output minus pending."""
        req = self._requests[request_id]
        return req.prompt_ids + req.token_ids[:-1]

    def request_kv(self, request_id: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [H, L, D] of a running request's cached tokens (``cached_tokens``)."""
        return self._cache.request_kv(self._running.index(self._requests[request_id]))

    def request_stats(self, request_id: str) -> ISDStats:
        return self._requests[request_id].stats

    @torch.no_grad()
    def measure_step_costs(self, batch_sizes: list[int], context: int = 256, reps: int = 3) -> StepCostTable:
        """Seconds of one decode forward at each batch size and each stride N = 1..``stride`` (2N - 1 rows per
        request, padded as real steps are), over a dummy cached context of ``context`` tokens: the median of
        ``reps`` forwards after one warm-up. The table `idlm.adaptive.AdaptiveStride` chooses N from."""
        sizes = sorted(set(int(b) for b in batch_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
        context = max(1, min(context, self.max_context - max_step_rows(self.stride) - 8))
        strides = range(1, self.stride + 1)
        fill = self.mask_token_id if self.mask_token_id is not None else 0
        seconds = []
        for b in sizes:
            cache = PaddedKVCache([0] * b, self.device)
            ids = torch.full((b, context), fill, dtype=torch.long, device=self.device)
            positions = torch.arange(context, device=self.device).expand(b, context)
            self._forward(cache, ids, positions, None, 1)
            cache.commit([context] * b)
            row = []
            for n in strides:
                width = self._step_width(2 * n - 1, b, n, context)
                step_ids = torch.full((b, width), fill, dtype=torch.long, device=self.device)
                step_pos = (context + torch.arange(width, device=self.device)).expand(b, width)
                lora_rows = (torch.arange(width, device=self.device) >= n).expand(b, width) if n > 1 else None
                times = []
                for _ in range(reps + 1):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    t0 = time.perf_counter()
                    self._forward(cache, step_ids, step_pos, lora_rows)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    times.append(time.perf_counter() - t0)
                    cache.commit([0] * b)
                row.append(statistics.median(times[1:]))
            seconds.append(tuple(row))
        return StepCostTable(tuple(sizes), tuple(2 * n - 1 for n in strides), tuple(seconds))

    # -- internals --------------------------------------------------------------------------------------------------

    @contextmanager
    def _gated(self, mask_rows: torch.Tensor | None) -> Iterator[None]:
        if self._gate is None:
            yield
        else:
            with self._gate.rows(mask_rows) if mask_rows is not None else self._gate.bypass():
                yield

    def _forward(self, cache: PaddedKVCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 lora_rows: torch.Tensor | None, logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        """Run the step rows [B, R] over ``cache`` (which receives their KV); returns the logits [B, R', V].
        lora_rows: [B, R] the MASK rows R-ISD's LoRA runs on; None when there is none (a prefill, an N = 1 step),
        which skips the LoRA branches altogether."""
        num_rows = input_ids.shape[1]
        mask = cache.attention_mask(num_rows, self._mask_dtype)
        with self._gated(lora_rows):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             past_key_values=cache.hf_cache(num_rows, self._num_layers), use_cache=True,
                             logits_to_keep=logits_to_keep)
        return out.logits

    def _step_width(self, need: int, batch: int, stride: int, context: int) -> int:
        """Rows per request of one ISD decode forward: ``need`` (the widest request's 1 + k + N - 1), padded on a CPU
        until batch x rows is a multiple of 8 where the context has room. CPU matmuls are slower for a row count off
        a multiple of 8 (a SmolLM2-135M forward on 2 cores took 109-131 ms at 7 rows and 91-120 ms at 8:
        scripts/dev/cpu_row_cost.py, docs/results/small_scale.md). The extra rows are MASK rows after every real one:
        causal attention keeps them out of the real rows' outputs, and the cache drops their KV with the other
        unaccepted rows. context: the longest request's cached tokens."""
        if self.device.type != "cpu" or stride == 1:
            return need
        width = need
        while (batch * width) % 8:
            width += 1
        return width if context + width <= self.max_context else need

    def _params(self, reqs: list[_Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.device
        return (torch.tensor([r.params.temperature for r in reqs], device=dev, dtype=torch.float64),
                torch.tensor([r.params.top_k for r in reqs], device=dev),
                torch.tensor([r.params.top_p for r in reqs], device=dev, dtype=torch.float64))

    # A batched prefill or decode that raises before it commits anything is retried one request at a time, so a
    # request that breaks the step ends alone (finish_reason "error") and the others go on as if it never ran with
    # them (their generators are rewound; outputs do not depend on the batch). A failure after the cache moved is not
    # attributable: it propagates and the caller fails the whole batch.

    def _prefill_guarded(self, reqs: list[_Request]) -> list[_Request]:
        running, lengths, rng = len(self._running), list(self._cache.lengths), _rng_states(reqs)
        try:
            return self._prefill(reqs)
        except Exception as exc:
            if len(self._running) != running or self._cache.lengths != lengths:
                raise
            if len(reqs) == 1:
                return self._failed(reqs[0], exc)
        _set_rng_states(rng)
        for req in reqs:
            try:
                self._prefill([req])
            except Exception as exc:
                if len(self._running) != running or self._cache.lengths != lengths:
                    raise
                self._failed(req, exc)
            running, lengths = len(self._running), list(self._cache.lengths)
        return reqs

    def _decode_guarded(self) -> list[_Request]:
        reqs, lengths, rng = list(self._running), list(self._cache.lengths), _rng_states(self._running)
        try:
            return self._decode()
        except Exception as exc:
            if self._running != reqs or self._cache.lengths != lengths:
                raise
            if len(reqs) == 1:
                self._running, self._cache = [], PaddedKVCache([], self.device)
                return self._failed(reqs[0], exc)
        _set_rng_states(rng)
        full, kept, caches = self._cache, [], []
        for i, req in enumerate(reqs):
            self._running, self._cache = [req], full.subset(i)
            try:
                self._decode()
            except Exception as exc:
                self._failed(req, exc)
                continue
            if req.finish_reason is None:
                kept.append(req)
                caches.append(self._cache)
        merged = PaddedKVCache([], self.device)
        for cache in caches:
            merged.extend(cache)
        self._running, self._cache = kept, merged
        return reqs

    @staticmethod
    def _failed(req: _Request, exc: Exception) -> list[_Request]:
        log.warning("request %s failed in an engine step: %s: %s", req.request_id, type(exc).__name__, exc,
                    exc_info=True)
        req.fail(exc)
        return [req]

    def _prefill(self, reqs: list[_Request]) -> list[_Request]:
        """Prefill prompts (one forward, right-padded), sample and emit each request's first token."""
        lengths = [len(r.prompt_ids) for r in reqs]
        width = max(lengths)
        ids = torch.zeros(len(reqs), width, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :lengths[i]] = torch.tensor(r.prompt_ids)
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(reqs), width)
        cache = PaddedKVCache([0] * len(reqs), self.device)
        last = sorted(set(n - 1 for n in lengths))  # only the last prompt row's logits are needed
        keep_idx = torch.tensor(last, device=self.device)
        logits = self._forward(cache, ids, positions, None, keep_idx)
        cache.commit(lengths)
        col = torch.tensor([last.index(n - 1) for n in lengths], device=self.device)
        last_logits = logits[torch.arange(len(reqs), device=self.device), col]  # [B, V]
        if all(r.greedy for r in reqs):
            first = last_logits.argmax(-1)
        else:
            probs = process_logits(last_logits, *self._params(reqs))
            first = sample_from_probs(probs, torch.stack([r.uniforms(1)[0] for r in reqs]))
        survivors = []
        for i, (req, tok) in enumerate(zip(reqs, first.tolist())):
            req.stats.record_prefill(req.emit([tok]))
            req.pending, req.num_drafts, req.drafts = tok, 0, [0] * (self.stride - 1)
            if req.finish_reason is None:
                survivors.append(i)
        if survivors:
            cache.select(survivors)
            self._cache.extend(cache)
            self._running += [reqs[i] for i in survivors]
        return reqs

    def _decode(self) -> list[_Request]:
        """One batched ISD forward over all running requests; emits tokens, trims the cache, retires finished ones."""
        reqs, dev, t0 = self._running, self.device, time.perf_counter()
        n = self.stride_policy.choose(len(reqs)) if self.stride_policy is not None else self.stride
        k_max = n - 1
        for req in reqs:
            _fit_drafts(req, k_max)
        pending = torch.tensor([r.pending for r in reqs], device=dev)
        drafts = torch.tensor([r.drafts for r in reqs], dtype=torch.long, device=dev).view(len(reqs), k_max)
        num_drafts = torch.tensor([r.num_drafts for r in reqs], device=dev)
        committed = torch.tensor(self._cache.lengths, device=dev)
        width = self._step_width(n + max(r.num_drafts for r in reqs), len(reqs), n, max(self._cache.lengths))
        step = build_step(pending, drafts, num_drafts, committed, n, self.mask_token_id, num_rows=width)
        logits = self._forward(self._cache, step.input_ids, step.position_ids, step.mask_rows if n > 1 else None)
        p_logits = gather_rows(logits, step.verify_rows)  # [B, N, V]
        q_logits = gather_rows(logits, step.draft_rows)  # [B, N - 1, V]

        if all(r.greedy for r in reqs):
            accepted, nxt = verify_greedy(p_logits.argmax(-1), drafts, num_drafts)
            new_drafts, new_q = q_logits.argmax(-1), None
        else:
            params = self._params(reqs)
            p_probs = process_logits(p_logits, *params)
            draft_temp = torch.tensor([r.params.draft_temperature for r in reqs], device=dev, dtype=torch.float64)
            q_probs = process_logits(q_logits, params[0] * draft_temp, *params[1:]) if k_max else q_logits.float()
            u = torch.stack([r.uniforms(2 * k_max + 1) for r in reqs]).to(dev)  # fixed count: batch-independent
            modes = [r.verify_mode for r in reqs]
            old_q = None
            if any(r.q_probs is not None for r in reqs):
                old_q = torch.stack([r.q_probs if r.q_probs is not None else torch.zeros_like(q_probs[0])
                                     for r in reqs])
            accepted, nxt = verify_drafts(p_probs, old_q, drafts, num_drafts, u[:, :k_max], u[:, k_max], modes)
            new_drafts = propose_drafts(q_probs, u[:, k_max + 1:], modes)
            new_q = q_probs

        self._cache.commit(rows_to_keep(accepted).tolist())
        tokens = step_tokens(drafts, accepted, nxt).tolist()
        acc_list, nxt_list = accepted.tolist(), nxt.tolist()
        next_k = next_num_drafts(num_drafts, accepted, n).tolist()
        new_drafts_list = new_drafts.tolist()
        keep = []
        step_stats = ISDStats(self.stride)  # this step's counts over the batch, for the stride policy
        for i, req in enumerate(reqs):
            emitted = req.emit(tokens[i][:acc_list[i] + 1])
            req.stats.record_step(req.num_drafts, acc_list[i], emitted)
            step_stats.record_step(req.num_drafts, acc_list[i], emitted)
            req.pending, req.num_drafts = nxt_list[i], next_k[i]
            req.drafts = new_drafts_list[i] if next_k[i] else [0] * k_max
            ratio_rule = req.verify_mode != "argmax"
            req.q_probs = new_q[i] if (next_k[i] and ratio_rule and new_q is not None) else None
            if req.finish_reason is None:
                keep.append(i)
        if len(keep) < len(reqs):
            self._cache.select(keep)
            self._running = [reqs[i] for i in keep]
        if self.stride_policy is not None:  # the whole step, synchronised by the .tolist() reads above
            self.stride_policy.observe(step_stats.attempted[:k_max], step_stats.accepted[:k_max])
            self.stride_policy.observe_cost(len(reqs), n, time.perf_counter() - t0)
        return reqs


def _fit_drafts(req: _Request, k_max: int) -> None:
    """Give a request's draft state the length of a step at stride k_max + 1: drafts (and q rows) beyond it are
    dropped, missing ones are padding past ``num_drafts`` (the step then verifies fewer drafts)."""
    k = len(req.drafts)
    if k > k_max:
        req.drafts, req.num_drafts = req.drafts[:k_max], min(req.num_drafts, k_max)
        if req.q_probs is not None:
            req.q_probs = req.q_probs[:k_max] if k_max else None
    elif k < k_max:
        req.drafts = req.drafts + [0] * (k_max - k)
        if req.q_probs is not None:
            req.q_probs = torch.cat([req.q_probs, req.q_probs.new_zeros(k_max - k, req.q_probs.shape[-1])])


def _rng_states(reqs: list[_Request]) -> list[tuple[torch.Generator, torch.Tensor]]:
    return [(r.generator, r.generator.get_state()) for r in reqs if r.generator is not None]


def _set_rng_states(states: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in states:
        generator.set_state(state)
