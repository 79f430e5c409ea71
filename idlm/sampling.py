"""Sampling primitives over batched tensors: logit processing and inverse-CDF sampling.

Everything is a pure function of its inputs. Randomness comes in as uniforms drawn by the caller (one
``torch.Generator`` per request), so a request's samples do not depend on which other requests share its batch.

Shapes: ``B`` requests, ``V`` vocabulary rows, ``...`` any number of middle dimensions (e.g. draft slots).
Per-request parameters are tensors of shape ``[B]`` (or Python scalars) and broadcast over the middle dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.requests import is_greedy

Param = torch.Tensor | float | int


def _param(value: Param, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-request parameter as a tensor [B, 1, ..., 1] that broadcasts against ``like`` [B, ..., V]."""
    t = torch.as_tensor(value, dtype=dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"per-request parameter must have shape [{like.shape[0]}], got {tuple(t.shape)}")
    return t.view((like.shape[0],) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class BatchHints:
    """What a caller already knows on the CPU about a batch's sampling parameters, so that `process_logits` need
    not read it back from the GPU (each read is a device sync, which an asynchronous scheduler must not see).

    any_top_k: some row keeps fewer than V tokens; max_top_k: the largest k of any row, V for rows without top-k
    (the width of the top-k pass); any_top_p: some row has top_p < 1; any_greedy: some row is greedy
    (`idlm.requests.is_greedy`: temperature <= 0 or top_k == 1).
    They must describe the same rows as the tensors (`BatchHints.of` computes them from the Python values).
    """

    any_top_k: bool
    max_top_k: int
    any_top_p: bool
    any_greedy: bool

    @classmethod
    def of(cls, temperatures, top_ks, top_ps, vocab: int) -> BatchHints:
        """From per-row Python numbers (the same conventions as `process_logits`: k <= 0 or >= V is off)."""
        ks = [vocab if (k <= 0 or k >= vocab) else int(k) for k in top_ks]
        return cls(any_top_k=any(k < vocab for k in ks), max_top_k=max(ks, default=vocab),
                   any_top_p=any(p < 1 for p in top_ps),
                   any_greedy=any(is_greedy(t, k) for t, k in zip(temperatures, top_ks)))


def _scaled(logits: torch.Tensor, temperature: Param, top_k: Param) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """logits [B, ..., V] divided by each row's temperature (float32, or float64 for float64 logits; greedy rows are
    left unscaled), top_k as [B, 1, ..., 1] with "off" (<= 0 or >= V) written as V, and the greedy rows' mask."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    vocab = x.shape[-1]
    temp = _param(temperature, x, dtype)
    k = _param(top_k, x, torch.long)
    greedy = is_greedy(temp, k)
    x = x / torch.where(temp <= 0, torch.ones_like(temp), temp)
    return x, torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k), greedy


@dataclass(frozen=True)
class Candidates:
    """Each row's candidate tokens before the top-k / top-p cut (`candidates`): what the passes over V produce.

    ids [B, ..., W] long, most likely first (a greedy row's first is the raw logits' argmax); scaled [B, ..., W] their
    logits / temperature; lse [B, ..., 1] the log-sum-exp of a row's scaled logits over all of V; keep_k [B, 1, ...]
    how many of the first stay by top-k (1 for greedy rows). W = the widest top-k of the batch (V when some row has
    none)."""

    ids: torch.Tensor
    scaled: torch.Tensor
    lse: torch.Tensor
    keep_k: torch.Tensor


def candidates(logits: torch.Tensor, temperature: Param, top_k: Param = 0, hints: BatchHints | None = None
               ) -> Candidates:
    """The passes over the vocabulary of the sampling rule: temperature, one ``topk`` of width max k (a sort when
    some row has no top-k) and the log-sum-exp. logits [B, ..., V]; temperature, top_k [B] or scalars."""
    x, k, greedy = _scaled(logits, temperature, top_k)
    vocab = x.shape[-1]
    any_top_k = hints.any_top_k if hints is not None else bool((k < vocab).any())
    width = vocab
    if any_top_k:
        width = min(hints.max_top_k, vocab) if hints is not None else int(k.max())
    top, ids = torch.topk(x, width, dim=-1) if width < vocab else x.sort(dim=-1, descending=True)
    if hints.any_greedy if hints is not None else bool(greedy.any()):
        # AR's argmax: ties go to the lowest id (topk's order among ties is unspecified)
        first = torch.where(greedy.squeeze(-1), logits.argmax(-1), ids[..., 0])
        ids = torch.cat([first.unsqueeze(-1), ids[..., 1:]], dim=-1)
    return Candidates(ids=ids, scaled=top, lse=torch.logsumexp(x, dim=-1, keepdim=True),
                      keep_k=torch.where(greedy, torch.ones_like(k), k))


def filtered_probs(c: Candidates, top_p: Param = 1.0, hints: BatchHints | None = None) -> torch.Tensor:
    """The top-k / top-p cut of `candidates`, renormalised: probs [B, ..., W], zero past the kept tokens.

    A token stays when it is among the first ``keep_k`` and the mass of the tokens before it, in the full
    distribution softmax(logits / T), is at most ``top_p`` (the first always stays)."""
    probs = torch.exp(c.scaled - c.lse)  # the full distribution's, not renormalised
    width = probs.shape[-1]
    keep = torch.arange(width, device=probs.device) < c.keep_k
    p = _param(top_p, probs, probs.dtype)
    if hints.any_top_p if hints is not None else bool((p < 1).any()):
        mass_before = probs.cumsum(-1) - probs
        keep = keep & ((mass_before <= p) | (p >= 1))  # a prefix; the first token always stays
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def candidate_probs(logits: torch.Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0,
                    hints: BatchHints | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's sampling distribution over its candidate tokens, the filtered distribution in sparse form.

    logits: [B, ..., V]. temperature, top_k, top_p: [B] per request (or scalars). hints: as for `process_logits`.
    Returns (ids [B, ..., W] long, most likely first; probs [B, ..., W], zero past the kept tokens, each row summing
    to 1), W = the widest top-k of the batch (V, sorted, when some row has none). The rule is `process_logits`'.
    """
    c = candidates(logits, temperature, top_k, hints)
    return c.ids, filtered_probs(c, top_p, hints)


def process_logits(logits: torch.Tensor, temperature: Param, top_k: Param = 0, top_p: Param = 1.0,
                   hints: BatchHints | None = None) -> torch.Tensor:
    """Turn raw logits into the sampling distribution of each row.

    logits: [B, ..., V]. temperature, top_k, top_p: [B] per request (or scalars).
    hints: the same facts known on the CPU (`BatchHints`); without them they are read from the tensors.
    Returns probs [B, ..., V] in float32 (float64 when the logits are float64), each row summing to 1.

    The rule is SGLang's sampler's ("joint": both filters on the one distribution softmax(logits / temperature), not
    top-p on the renormalised top-k as transformers' warpers do), so that ISD's later tokens and the first token,
    which SGLang samples, follow one distribution. Most likely first, a token stays when it is among the first
    ``top_k`` (``0`` = off) and the mass of the tokens before it is at most ``top_p`` (``top_p >= 1`` = off; the
    first token always stays); the rest is renormalised. Among tokens tied at the k-th place, which stay follows
    ``torch.topk``'s order (SGLang's, its sort's).
    Greedy rows (`idlm.requests.is_greedy`: ``temperature <= 0`` or ``top_k == 1``) become a one-hot at the argmax
    of the raw logits (ties go to the lowest id, as AR's argmax): with one-hot p and q the ISD acceptance rules
    reduce exactly to greedy verification, so callers need no special case.

    Cost: with top-k on every row (the paper's protocol: k = 50), one ``topk`` of width max k and a few elementwise
    passes over V (`candidate_probs`, scattered back); only a top-p row without top-k needs a full sort.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    if hints is not None:
        filtered = hints.any_top_k or hints.any_top_p
    else:
        k = _param(top_k, logits, torch.long)
        filtered = bool(((k > 0) & (k < vocab)).any()) or bool((_param(top_p, logits, dtype) < 1).any())
    if not filtered:  # temperature alone (and greedy rows): no candidates to pick, no sort
        x, _, greedy = _scaled(logits, temperature, top_k)
        probs = torch.softmax(x, dim=-1)
        if hints.any_greedy if hints is not None else bool(greedy.any()):
            onehot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).to(dtype)
            probs = torch.where(greedy, onehot, probs)
        return probs
    ids, probs = candidate_probs(logits, temperature, top_k, top_p, hints)
    return torch.zeros(logits.shape, dtype=probs.dtype, device=logits.device).scatter_(-1, ids, probs)


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: token ids [B, ...] from probs [B, ..., V] and uniforms in [0, 1) of shape [B, ...].

    Rows need not be normalised (they are scaled by their total). A token with zero mass is never returned.
    The CDF is accumulated in float64 so that float32 rounding cannot push the draw past the last token.
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    target = uniforms.to(device=probs.device, dtype=torch.float64).unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).squeeze(-1)
    # u * total can round up to total: fall back to the last token with positive mass.
    vocab = probs.shape[-1]
    last = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def normalize(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """weights [..., V] divided by their sum; rows with no positive mass are replaced by ``fallback`` [..., V]."""
    total = weights.sum(-1, keepdim=True)
    empty = total <= 0
    return torch.where(empty, fallback, weights / torch.where(empty, torch.ones_like(total), total))
