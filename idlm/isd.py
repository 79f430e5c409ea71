"""Introspective Strided Decoding (ISD): the step math as plain, batched PyTorch functions.

Shared by the reference engine (`idlm.inference.engine`) and any other runtime (SGLang), so nothing here knows
about a model, a cache object or a scheduler.

State of one request between steps, stride N (K = N - 1 draft slots):

* committed tokens: prompt and accepted output, their KV is in the cache (``committed_len`` of them);
* one *pending* token: sampled from the AR distribution p and already emitted, but not yet in the cache;
* ``k`` drafts (k = K in the steady state, k = 0 at the start and after a rejection = "cold start") with their
  draft distributions q, read from the previous step's MASK rows.

One forward reads, per request, the rows ``[pending, draft_1 .. draft_k, MASK x K]`` (padded with more MASK rows
to a common width; they come after every real row, so causal attention makes them harmless) at positions
``committed_len, committed_len + 1, ...``. The hidden state of row i predicts the token after row i, so:

* row j (0 <= j < k) gives p for draft j+1; row k gives p for the token after all drafts (the "bonus");
* MASK row m (0 <= m < K), i.e. row k + 1 + m, gives q for the token at position ``committed_len + k + 2 + m``:
  the drafts of the next step, which sit right after the new pending token.

Drafts are verified in order (`verify_drafts`); at the first rejection a correction is sampled and the step's
MASK-row drafts are discarded (they conditioned on a rejected draft), so the next step is a cold start.
After a step, pending + accepted drafts (``1 + accepted_len`` rows) keep their KV; every other row is trimmed;
the correction or bonus token becomes the new pending token. Stride 1 is plain AR decoding: rows ``[pending]``.

Draft modes (how drafts are proposed from q, and the matching exact acceptance rule):

* ``"sample"``: x ~ q; accept with probability min(1, p(x)/q(x)); on rejection sample from
  normalise(max(0, p - q)) (from p if that has no mass). Exact: every emitted token follows p.
* ``"argmax"``: x = argmax q (deterministic); accept with probability p(x); on rejection sample from p
  restricted to V \\ {x}, renormalised. Also exact.
* ``"paper_argmax"``: x = argmax q with the "sample" rule, as the paper's code does. Biased towards x (it is
  accepted with probability min(1, p(x)/q(x)) >= p(x)); it exists only so that a test can show the bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from idlm.config import step_rows
from idlm.requests import SERVING_DRAFT_MODES
from idlm.sampling import normalize, sample_from_probs

DRAFT_MODES = (*SERVING_DRAFT_MODES, "paper_argmax")


def check_draft_mode(mode: str) -> None:
    if mode not in DRAFT_MODES:
        raise ValueError(f"unknown draft mode {mode!r}; choose one of {', '.join(DRAFT_MODES)}")


def _mode_mask(mode: str | Sequence[str], batch: int, name: str, device: torch.device) -> torch.Tensor:
    """[B] bool: True where the request uses draft mode ``name``. One mode for the batch builds the mask on the
    device (no host-to-device copy, which would synchronise the stream)."""
    if isinstance(mode, str):
        check_draft_mode(mode)
        return torch.full((batch,), mode == name, dtype=torch.bool, device=device)
    modes = list(mode)
    if len(modes) != batch:
        raise ValueError(f"got {len(modes)} draft modes for a batch of {batch}")
    for m in modes:
        check_draft_mode(m)
    return torch.tensor([m == name for m in modes], dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Step layout


def num_step_rows(num_drafts: torch.Tensor, stride: int) -> torch.Tensor:
    """Rows a request really needs this step, [B]: 1 + k + (N - 1), or 1 for stride 1 (plain AR)."""
    if stride == 1:
        return torch.ones_like(num_drafts)
    return 1 + num_drafts + (stride - 1)


def max_step_rows(stride: int) -> int:
    """The widest step (steady state): `idlm.config.step_rows` (2N - 1) rows, 1 for stride 1 (plain AR)."""
    return 1 if stride == 1 else step_rows(stride)


@dataclass
class StepInputs:
    """The rows of one batched ISD forward.

    input_ids:    [B, R] pending, drafts, then MASK rows (padding included).
    position_ids: [B, R] committed_len + row index.
    mask_rows:    [B, R] bool, True on rows that hold MASK (draft rows and padding): where R-ISD's LoRA is on.
    verify_rows:  [B, N] long, row whose logits give p for draft slot j + 1 (j < k) and, at j = k, for the token
                  after all drafts; entries j > k repeat row k (callers ignore them).
    draft_rows:   [B, N - 1] long, the MASK rows whose logits give the next step's q, slot by slot.
    num_rows:     [B] long, rows the request needs; the rest of its R rows are MASK padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mask_rows: torch.Tensor
    verify_rows: torch.Tensor
    draft_rows: torch.Tensor
    num_rows: torch.Tensor


def build_step(
    pending: torch.Tensor,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    committed_len: torch.Tensor,
    stride: int,
    mask_token_id: int | None,
    num_rows: int | None = None,
) -> StepInputs:
    """Lay out one ISD step for a batch.

    pending: [B] token ids. drafts: [B, N - 1] (entries beyond ``num_drafts`` are ignored).
    num_drafts: [B] in {0, N - 1} (any 0..N-1 works). committed_len: [B] tokens in the cache (first position).
    num_rows: R, the common width (default: the widest request); must be >= every request's need (2N - 1 always is).
    """
    device = pending.device
    k = num_drafts.to(device=device, dtype=torch.long)
    need = num_step_rows(k, stride)
    width = int(need.max()) if num_rows is None else num_rows
    # a width of 2N - 1 fits every request: no data-dependent check (it would sync the GPU, which SGLang's overlap
    # scheduler must not see inside a step)
    if width < max_step_rows(stride) and width < int(need.max()):
        raise ValueError(f"num_rows={width} is smaller than the {int(need.max())} rows a request needs")
    cols = torch.arange(width, device=device)
    batch = pending.shape[0]
    if stride > 1:
        if mask_token_id is None:
            raise ValueError("stride > 1 needs a mask token id")
        draft_at = drafts.to(device=device, dtype=torch.long).gather(
            1, (cols - 1).clamp(0, stride - 2).expand(batch, width))
        is_draft = (cols >= 1) & (cols <= k[:, None])
        ids = torch.where(is_draft, draft_at, torch.full_like(draft_at, mask_token_id))
        ids[:, 0] = pending
        mask_rows = cols > k[:, None]
    else:
        ids = pending.to(torch.long)[:, None].expand(batch, width).clone()
        mask_rows = torch.zeros(batch, width, dtype=torch.bool, device=device)
    positions = committed_len.to(device=device, dtype=torch.long)[:, None] + cols
    verify_rows = torch.minimum(torch.arange(stride, device=device).expand(batch, stride), k[:, None])
    draft_rows = k[:, None] + 1 + torch.arange(stride - 1, device=device)
    return StepInputs(ids, positions, mask_rows, verify_rows, draft_rows, need)


def gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values [B, R, ...] at row indices rows [B, M] -> [B, M, ...] (e.g. hidden states or logits)."""
    idx = rows.view(rows.shape + (1,) * (values.dim() - 2)).expand(rows.shape + values.shape[2:])
    return values.gather(1, idx)


# ----------------------------------------------------------------------------------------------------------------
# Drafts and verification


def propose_drafts(q_probs: torch.Tensor, uniforms: torch.Tensor, mode: str | Sequence[str]) -> torch.Tensor:
    """Next step's drafts [B, K] from q_probs [B, K, V]: sampled (``"sample"``) or argmax (the other modes).

    uniforms: [B, K] in [0, 1), used only by ``"sample"`` rows.
    """
    if q_probs.shape[1] == 0:
        return torch.zeros(q_probs.shape[:2], dtype=torch.long, device=q_probs.device)
    if isinstance(mode, str):  # one mode for the batch: only its own pass (sampling costs a cumsum over V)
        check_draft_mode(mode)
        return sample_from_probs(q_probs, uniforms) if mode == "sample" else q_probs.argmax(-1)
    sampled = sample_from_probs(q_probs, uniforms)
    use_sample = _mode_mask(mode, q_probs.shape[0], "sample", q_probs.device)
    return torch.where(use_sample[:, None], sampled, q_probs.argmax(-1))


def verify_drafts(
    p_probs: torch.Tensor,
    q_probs: torch.Tensor | None,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
    mode: str | Sequence[str] = "sample",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of the drafts and sample the token that follows it.

    p_probs: [B, K + 1, V] processed target distributions; row j verifies draft j + 1, row ``num_drafts`` gives the
        bonus token after all drafts. q_probs: [B, K, V] processed draft distributions (may be None when no request
        has drafts under the ratio rule, e.g. all use ``"argmax"`` or all are cold starts).
    drafts: [B, K]. num_drafts: [B] (entries beyond it are ignored).
    accept_uniforms: [B, K], sample_uniforms: [B], all in [0, 1). mode: one draft mode, or one per request.
    Returns (accepted_len [B], next_token [B]): the first ``accepted_len`` drafts are accepted; ``next_token`` is the
    correction (when accepted_len < num_drafts) or the bonus token sampled from p at row ``num_drafts``.
    """
    batch, k_max = drafts.shape
    device = p_probs.device
    drafts = drafts.to(device=device, dtype=torch.long)
    point = _mode_mask(mode, batch, "argmax", device)  # accept with prob p(x); the rest use min(1, p/q)
    slots = torch.arange(k_max, device=device)
    valid = slots < num_drafts.to(device)[:, None]

    p_x = p_probs[:, :k_max].gather(-1, drafts[..., None]).squeeze(-1)  # [B, K]
    u = accept_uniforms.to(device=device, dtype=p_x.dtype)
    if q_probs is None:
        # (one "argmax" mode for the batch needs no q: skip the check, a device sync)
        if not (isinstance(mode, str) and mode == "argmax") and bool((valid & ~point[:, None]).any()):
            raise ValueError("q_probs is needed for drafts of the 'sample' and 'paper_argmax' modes")
        ratio_ok = torch.zeros_like(valid)
    else:
        q_x = q_probs.gather(-1, drafts[..., None]).squeeze(-1).to(p_x.dtype)
        ratio_ok = u * q_x < p_x  # u < min(1, p/q) without dividing (q(x) = 0 accepts iff p(x) > 0)
    accept = torch.where(point[:, None], u < p_x, ratio_ok) & valid
    accepted_len = accept.long().cumprod(-1).sum(-1)
    rejected = accepted_len < num_drafts.to(device)

    # The distribution of the token after the accepted prefix, at row accepted_len.
    p_row = p_probs.gather(1, accepted_len.view(batch, 1, 1).expand(batch, 1, p_probs.shape[-1])).squeeze(1)
    slot = accepted_len.clamp(max=max(k_max - 1, 0))
    if k_max > 0:
        x_row = drafts.gather(1, slot[:, None]).squeeze(1)
        not_x = p_row.scatter(-1, x_row[:, None], 0.0)
        if q_probs is not None:
            q_row = q_probs.gather(1, slot.view(batch, 1, 1).expand(batch, 1, q_probs.shape[-1])).squeeze(1)
            residual = (p_row - q_row.to(p_row.dtype)).clamp(min=0)
        else:
            residual = not_x
        correction = normalize(torch.where(point[:, None], not_x, residual), p_row)
        dist = torch.where(rejected[:, None], correction, p_row)
    else:
        dist = p_row
    next_token = sample_from_probs(dist, sample_uniforms)
    return accepted_len, next_token


def verify_point_drafts(
    p_ids: torch.Tensor,
    p_probs: torch.Tensor,
    drafts: torch.Tensor,
    num_drafts: torch.Tensor,
    accept_uniforms: torch.Tensor,
    sample_uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify_drafts` for ``"argmax"`` drafts (accept x with probability p(x); on rejection sample p without x),
    on p in sparse form (`idlm.sampling.candidate_probs`): no pass over the vocabulary.

    p_ids, p_probs: [B, K + 1, W] each row's candidate tokens and their probabilities (zero past the kept ones).
    drafts: [B, K]. num_drafts: [B]. accept_uniforms: [B, K], sample_uniforms: [B], in [0, 1).
    Returns (accepted_len [B], next_token [B]) with `verify_drafts`' meaning and distribution (the next token is
    drawn over the candidates in their order, so the same uniform can pick another token than the dense rule).
    """
    batch, k_max = drafts.shape
    device = p_probs.device
    drafts = drafts.to(device=device, dtype=torch.long)
    valid = torch.arange(k_max, device=device) < num_drafts.to(device)[:, None]
    is_x = p_ids[:, :k_max] == drafts[..., None]  # [B, K, W]
    p_x = (p_probs[:, :k_max] * is_x).sum(-1)
    accept = (accept_uniforms.to(device=device, dtype=p_x.dtype) < p_x) & valid
    accepted_len = accept.long().cumprod(-1).sum(-1)
    rejected = accepted_len < num_drafts.to(device)

    width = p_probs.shape[-1]
    ids_row = p_ids.gather(1, accepted_len.view(batch, 1, 1).expand(batch, 1, width)).squeeze(1)  # [B, W]
    p_row = p_probs.gather(1, accepted_len.view(batch, 1, 1).expand(batch, 1, width)).squeeze(1)
    if k_max > 0:
        x_row = drafts.gather(1, accepted_len.clamp(max=k_max - 1)[:, None])  # [B, 1]
        correction = normalize(p_row.masked_fill(ids_row == x_row, 0.0), p_row)
        p_row = torch.where(rejected[:, None], correction, p_row)
    pick = sample_from_probs(p_row, sample_uniforms)
    return accepted_len, ids_row.gather(1, pick[:, None]).squeeze(1)


def verify_greedy(
    p_argmax: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-0 verification: draft j is accepted iff it equals the argmax of p at row j - 1.

    p_argmax: [B, K + 1] argmax of the verify rows' logits. drafts: [B, K]. num_drafts: [B].
    Returns (accepted_len [B], next_token [B]) with next_token = argmax p at row accepted_len (correction or bonus).
    """
    k_max = drafts.shape[1]
    valid = torch.arange(k_max, device=drafts.device) < num_drafts[:, None]
    accept = (drafts == p_argmax[:, :k_max]) & valid
    accepted_len = accept.long().cumprod(-1).sum(-1)
    return accepted_len, p_argmax.gather(1, accepted_len[:, None]).squeeze(1)


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping


def rows_to_keep(accepted_len: torch.Tensor) -> torch.Tensor:
    """[B] step rows whose KV stays in the cache: the pending token and the accepted drafts (the leading rows)."""
    return 1 + accepted_len


def next_num_drafts(num_drafts: torch.Tensor, accepted_len: torch.Tensor, stride: int) -> torch.Tensor:
    """[B] drafts for the next step: N - 1 when every draft was accepted (the MASK rows saw only accepted tokens),
    else 0 (cold start)."""
    if stride == 1:
        return torch.zeros_like(num_drafts)
    return torch.where(accepted_len == num_drafts, stride - 1, 0)


def step_tokens(drafts: torch.Tensor, accepted_len: torch.Tensor, next_token: torch.Tensor) -> torch.Tensor:
    """Tokens a step emits, [B, K + 1]: the accepted drafts, then the next token; the first accepted_len + 1 are
    valid (the rest repeat the next token)."""
    batch, k_max = drafts.shape
    slots = torch.arange(k_max + 1, device=drafts.device)
    padded = torch.cat([drafts.to(next_token.device, torch.long), next_token[:, None]], 1)
    return torch.where(slots < accepted_len[:, None], padded, next_token[:, None])


@dataclass
class ISDStats:
    """Decoding statistics of one request.

    emitted: tokens appended to the request's output, counted when they are emitted. The first token is sampled from
        the prefill's last row and emitted then; each decode forward then emits its accepted drafts plus the next
        (correction or bonus) token, i.e. accepted_len + 1, fewer if a stop token or the length limit cuts it.
        Drafts count only once accepted. Equals len(output tokens).
    prefill_emitted: of those, the tokens sampled from prefill logits (the first token).
    forwards: decode forwards the request took part in (prefill forwards do not count).
    tpf: tokens emitted by decode forwards / decode forwards = (emitted - prefill_emitted) / forwards (0.0 before
        the first decode forward). Plain AR decoding (stride 1) gives exactly 1.0. The paper's code also counts
        the prefill token, which adds 1 / forwards; for outputs of hundreds of tokens the difference is negligible.
    attempted[k-1], accepted[k-1]: how often draft position k was tested (drafts 1..k-1 accepted) and accepted;
        ``acceptance`` is their ratio per position (0.0 where never attempted).
    rejections: steps that rejected a draft; cold_starts: decode steps that ran without drafts.
    """

    stride: int
    emitted: int = 0
    prefill_emitted: int = 0
    forwards: int = 0
    attempted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rejections: int = 0
    cold_starts: int = 0

    def __post_init__(self) -> None:
        if not self.attempted:
            self.attempted = [0] * (self.stride - 1)
        if not self.accepted:
            self.accepted = [0] * (self.stride - 1)

    def record_prefill(self, emitted: int) -> None:
        self.emitted += emitted
        self.prefill_emitted += emitted

    def record_step(self, num_drafts: int, accepted_len: int, emitted: int) -> None:
        """One decode forward: ``num_drafts`` tested, the first ``accepted_len`` accepted, ``emitted`` tokens output."""
        self.forwards += 1
        self.emitted += emitted
        if num_drafts == 0:
            self.cold_starts += 1
        elif accepted_len < num_drafts:
            self.rejections += 1
        for k in range(1, num_drafts + 1):
            if k > accepted_len + 1:
                break
            self.attempted[k - 1] += 1
            self.accepted[k - 1] += int(k <= accepted_len)

    def merge(self, other: ISDStats) -> None:
        """Add another request's counts (for totals over a run)."""
        if other.stride != self.stride:
            raise ValueError("cannot merge stats of different strides")
        self.emitted += other.emitted
        self.prefill_emitted += other.prefill_emitted
        self.forwards += other.forwards
        self.rejections += other.rejections
        self.cold_starts += other.cold_starts
        self.attempted = [a + b for a, b in zip(self.attempted, other.attempted)]
        self.accepted = [a + b for a, b in zip(self.accepted, other.accepted)]

    @property
    def tpf(self) -> float:
        return (self.emitted - self.prefill_emitted) / self.forwards if self.forwards else 0.0

    @property
    def acceptance(self) -> list[float]:
        return [acc / att if att else 0.0 for acc, att in zip(self.accepted, self.attempted)]
