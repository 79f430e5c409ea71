"""Per-request ISD state indexed by SGLang's req-pool slot, and one decode step's bookkeeping.

SGLang identifies a running request by its slot in the req-to-token pool (``batch.req_pool_indices``). The state a
request carries between ISD steps (pending token, drafts, their count, optionally their q) lives in tensors indexed
by that slot, so a step gathers and scatters it on the GPU with no per-request Python and no dependence on how the
scheduler filters or merges batches. A slot is reset whenever its request is prefilled (a new request, or a
retracted one coming back).

The step math is `idlm.isd`'s; this module only lays it out in SGLang's conventions:

* every request has exactly R = 2N - 1 rows (cold starts are padded with MASK rows, harmless under causal attention),
  so every decode forward has the same shape and CUDA graphs apply;
* ``accept_lens`` = accepted drafts + 1: the tokens emitted this step (accepted drafts, then the correction or bonus
  token) and, equally, the rows whose KV stays (pending + accepted drafts);
* ``next_token_ids`` is [B * R]: request b's emitted tokens are its first ``accept_lens[b]`` entries;
* ``new_seq_lens`` = seq_lens + accept_lens, the committed-KV frontier: KV of MASK rows and rejected drafts lies past it
  and is overwritten by the next step, never read.

Pure PyTorch; tested on CPU against greedy AR (tests/test_sglang_isd.py).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from idlm.isd import (
    StepInputs,
    build_step,
    gather_rows,
    next_num_drafts,
    propose_drafts,
    step_tokens,
    verify_drafts,
    verify_greedy,
    verify_point_drafts,
)
from idlm.requests import is_greedy
from idlm.sampling import BatchHints, candidates, filtered_probs, process_logits

from .config import ISDServeConfig

log = logging.getLogger(__name__)


@functools.cache
def _fused_verify():
    """`verify_sampling.fused_verify`, or None (logged once) where Triton is missing: the PyTorch rule is the same."""
    try:
        from .verify_sampling import fused_verify
    except ImportError as exc:
        log.warning("ISD: no fused sampled verification (%s); using the PyTorch ops", exc)
        return None
    return fused_verify


@dataclass
class SamplingView:
    """Per-request sampling settings of a batch, in SGLang's encoding.

    temperatures, top_ps: [B] float; top_ks: [B] int (SGLang writes greedy as top_k = 1 and "off" as a huge k).
    hints: the same facts known on the CPU (`idlm.sampling.BatchHints`, temperature 0 for the rows `greedy` marks),
    so that the step never reads them back from the GPU; None reads them from the tensors (a device sync each).
    """

    temperatures: torch.Tensor
    top_ks: torch.Tensor
    top_ps: torch.Tensor
    hints: BatchHints | None = None

    @property
    def greedy(self) -> torch.Tensor:
        """[B] bool: SGLang decodes these requests by argmax."""
        return is_greedy(self.temperatures, self.top_ks)


@dataclass
class ISDStepResult:
    """accept_lens [B] int32, next_token_ids [B * R] int64, new_seq_lens [B] (seq_lens' dtype), pending [B] (the
    new pending token: the correction or bonus token, last of the emitted ones), and for statistics num_drafts [B]
    (drafts verified this step) and accepted [B] (drafts accepted)."""

    accept_lens: torch.Tensor
    next_token_ids: torch.Tensor
    new_seq_lens: torch.Tensor
    pending: torch.Tensor
    num_drafts: torch.Tensor
    accepted: torch.Tensor


class ISDStateTable:
    """ISD state of every req-pool slot.

    size: req-pool slots. vocab_size: needed for draft_mode "sample" (q of shape [size, N - 1, V] is kept).
    """

    def __init__(self, size: int, cfg: ISDServeConfig, mask_token_id: int, device: torch.device | str,
                 vocab_size: int | None = None):
        self.cfg = cfg
        self.stride = cfg.stride
        self.rows = cfg.num_draft_tokens
        self.mask_token_id = int(mask_token_id)
        self.device = torch.device(device)
        k = self.stride - 1
        self.pending = torch.zeros(size, dtype=torch.long, device=self.device)
        self.drafts = torch.zeros(size, k, dtype=torch.long, device=self.device)
        self.num_drafts = torch.zeros(size, dtype=torch.long, device=self.device)
        self.q_probs: torch.Tensor | None = None
        if cfg.draft_mode == "sample":
            if vocab_size is None:
                raise ValueError("draft_mode 'sample' needs vocab_size (q is stored per slot)")
            self.q_probs = torch.zeros(size, k, vocab_size, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)

    def on_prefill(self, slots: torch.Tensor, first_tokens: torch.Tensor) -> None:
        """Requests at ``slots`` [B] were (re)prefilled and emitted ``first_tokens`` [B]: a cold start follows."""
        slots = slots.to(self.device, torch.long)
        self.pending[slots] = first_tokens.to(self.device, torch.long)
        self.num_drafts[slots] = 0

    def build(self, slots: torch.Tensor, seq_lens: torch.Tensor) -> StepInputs:
        """The rows of one decode forward for the requests at ``slots`` [B], whose committed KV lengths are
        ``seq_lens`` [B]. Every request gets exactly R = 2N - 1 rows."""
        slots = slots.to(self.device, torch.long)
        return build_step(self.pending[slots], self.drafts[slots], self.num_drafts[slots], seq_lens.to(self.device),
                          self.stride, self.mask_token_id, num_rows=self.rows)

    def commit(self, slots: torch.Tensor, step: StepInputs, logits: torch.Tensor, seq_lens: torch.Tensor,
               sampling: SamplingView | None = None) -> ISDStepResult:
        """Verify the step's drafts from its logits [B, R, V] (or [B * R, V]), propose the next drafts, update the
        slots' state and return what SGLang's scheduler consumes. ``sampling`` None means all requests are greedy."""
        slots = slots.to(self.device, torch.long)
        batch, n, k_max = slots.shape[0], self.stride, self.stride - 1
        logits = logits.view(batch, self.rows, -1)
        drafts, num_drafts = self.drafts[slots], self.num_drafts[slots]
        if sampling is None:  # every request greedy (SGLang's is_all_greedy, known on the CPU)
            # one argmax pass over [B, R, V], then gather token ids: no [B, N, V] copies of the logits
            top = logits.argmax(-1)  # [B, R]
            accepted, nxt = verify_greedy(top.gather(1, step.verify_rows), drafts, num_drafts)
            new_drafts = top.gather(1, step.draft_rows)
            new_q = None
        else:
            p_logits = gather_rows(logits, step.verify_rows)  # [B, N, V]
            greedy = sampling.greedy
            temp = torch.where(greedy, torch.zeros_like(sampling.temperatures), sampling.temperatures).view(-1)
            top_k, top_p = sampling.top_ks.view(-1), sampling.top_ps.view(-1)
            u = torch.rand(batch, 2 * k_max + 1, generator=self.generator, device=self.device, dtype=torch.float64)
            # one draft mode for the whole batch (no per-request list: building one from `greedy` would sync): greedy
            # rows have one-hot p and q, for which every exact rule is greedy verification (`process_logits`)
            mode = self.cfg.draft_mode
            hints = sampling.hints
            if mode == "argmax" and hints is not None and hints.max_top_k < logits.shape[-1]:
                # every row has top-k (the paper's protocol): p over its candidates, no pass over V after the top-k
                c = candidates(p_logits, temp, top_k, hints)
                fused = _fused_verify() if self.cfg.fused_verify and c.scaled.is_cuda else None
                if fused is not None:  # the rest in one kernel launch (same rule)
                    accepted, nxt = fused(c, top_p, drafts, num_drafts, u[:, :k_max], u[:, k_max])
                else:
                    accepted, nxt = verify_point_drafts(c.ids, filtered_probs(c, top_p, hints), drafts, num_drafts,
                                                        u[:, :k_max], u[:, k_max])
            else:
                p_probs = process_logits(p_logits, temp, top_k, top_p, hints)
                old_q = self.q_probs[slots] if self.q_probs is not None else None
                accepted, nxt = verify_drafts(p_probs, old_q, drafts, num_drafts, u[:, :k_max], u[:, k_max], mode)
            if mode == "sample":
                q_logits = gather_rows(logits, step.draft_rows)  # [B, N - 1, V]
                new_q = process_logits(q_logits, temp, top_k, top_p, hints)
                new_drafts = propose_drafts(new_q, u[:, k_max + 1:], mode)
            else:
                # argmax drafts need no q: the argmax of the processed q is the raw logits' (every filter keeps the
                # most likely token), and verification accepts x with probability p(x) alone
                new_q = None
                new_drafts = logits.argmax(-1).gather(1, step.draft_rows)
        tokens = step_tokens(drafts, accepted, nxt)  # [B, N]
        out = torch.zeros(batch, self.rows, dtype=torch.long, device=self.device)
        out[:, :n] = tokens
        accept_lens = (accepted + 1).to(torch.int32)
        self.pending[slots] = nxt
        self.drafts[slots] = new_drafts
        self.num_drafts[slots] = next_num_drafts(num_drafts, accepted, n)
        if self.q_probs is not None and new_q is not None:
            self.q_probs[slots] = new_q.to(self.q_probs.dtype)
        new_seq_lens = seq_lens + accept_lens.to(seq_lens.device, seq_lens.dtype)
        return ISDStepResult(accept_lens, out.view(-1), new_seq_lens, nxt, num_drafts, accepted)
