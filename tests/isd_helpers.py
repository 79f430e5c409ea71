"""Engine-independent references for the ISD tests: naive AR decoding, exact AR distributions, G tests, a bigram
model driving the SGLang stepper, and the choice of a stop token that spreads sampled output lengths."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import torch

from idlm.sampling import BatchHints, process_logits

if TYPE_CHECKING:
    from idlm.inference.sglang_isd.stepper import SamplingView


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning threads make each
    forward 10-20x slower. Import this fixture into a test module to run it single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def naive_greedy(model, prompt: list[int], max_new_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy AR decoding the slow, obvious way: the full sequence every step, no cache, argmax of the last row."""
    device = next(model.parameters()).device
    seq = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(model(input_ids=torch.tensor([seq], device=device)).logits[0, -1].argmax())
        seq.append(tok)
        out.append(tok)
        if tok in stop:
            break
    return out


@torch.no_grad()
def exact_ar_distribution(model, prompt: list[int], num_tokens: int, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> dict[tuple[int, ...], float]:
    """P(first ``num_tokens`` generated tokens) of AR sampling under the given processing, by enumeration
    (one uncached forward per prefix with positive probability)."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(num_tokens):
        prefixes = list(probs)
        ids = torch.tensor([prompt + list(s) for s in prefixes], device=next(model.parameters()).device)
        logits = model(input_ids=ids).logits[:, -1]
        n = len(prefixes)
        p = process_logits(logits, torch.full((n,), temperature, dtype=torch.float64), torch.full((n,), top_k),
                           torch.full((n,), top_p, dtype=torch.float64))
        probs = {s + (v,): probs[s] * pv for s, row in zip(prefixes, p.tolist()) for v, pv in enumerate(row) if pv > 0}
    return probs


def g_test(expected: dict[tuple[int, ...], float], samples: list[tuple[int, ...]], min_count: float = 5.0):
    """G test of ``samples`` against the distribution ``expected``; returns (p_value, degrees of freedom).

    Cells with expected count < ``min_count`` are pooled into one cell; so are samples outside ``expected``
    (impossible sequences), which make the statistic infinite when the pooled expectation is 0.
    """
    counts = Counter(samples)
    n = len(samples)
    cells, pool_obs, pool_exp = [], 0, 0.0
    for seq, prob in expected.items():
        obs, exp = counts.pop(seq, 0), prob * n
        if exp >= min_count:
            cells.append((obs, exp))
        else:
            pool_obs, pool_exp = pool_obs + obs, pool_exp + exp
    pool_obs += sum(counts.values())
    if pool_obs or pool_exp:
        cells.append((pool_obs, pool_exp))
    if any(obs > 0 and exp == 0 for obs, exp in cells):
        return 0.0, len(cells) - 1
    stat = 2 * sum(obs * torch.log(torch.tensor(obs / exp, dtype=torch.float64)).item() for obs, exp in cells if obs)
    df = len(cells) - 1
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(p), df



def g_test_two_sample(a: list, b: list, min_count: float = 5.0) -> tuple[float, int]:
    """G test that two samples (of hashable outcomes) come from one distribution: (p_value, degrees of freedom).

    The 2 x K table of counts is tested for independence; outcomes whose expected count (under the pooled
    distribution) is below ``min_count`` in either sample are pooled into one cell."""
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    n = na + nb
    cells, pool = [], [0, 0]
    for key in set(ca) | set(cb):
        oa, ob = ca.get(key, 0), cb.get(key, 0)
        tot = oa + ob
        if min(tot * na / n, tot * nb / n) >= min_count:
            cells.append((oa, ob))
        else:
            pool[0] += oa
            pool[1] += ob
    if sum(pool):
        cells.append(tuple(pool))
    if len(cells) < 2:
        return 1.0, 0
    stat = 0.0
    for oa, ob in cells:
        tot = oa + ob
        for obs, size in ((oa, na), (ob, nb)):
            if obs:
                stat += 2 * obs * math.log(obs / (tot * size / n))
    df = len(cells) - 1
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    return float(p), df


@dataclass
class BigramModel:
    """A model whose row logits depend on its input token and position only (the KV cache is implicit), at the
    paper's kind of sampling (temperature with top-k and top-p both set), and the token its prompt's prefill emits
    (the most likely one: every request conditioned on it shares the prompt's cache)."""

    table: torch.Tensor  # [V, V] logits by input token
    pos_bias: torch.Tensor  # [64, V] logits by position
    temperature: float
    top_k: int
    top_p: float
    mask: int
    prompt_len: int = 5
    prompt_last: int = 2
    first: int = -1

    @classmethod
    def random(cls, device: str, vocab: int = 9, temperature: float = 1.0, top_k: int = 6, top_p: float = 0.95,
               seed: int = 0, token_scale: float = 1.5, pos_scale: float = 0.5) -> BigramModel:
        """Random logits, ``token_scale`` by input token plus ``pos_scale`` by position: where the position's part
        dominates, the MASK rows (which see no token) draft well and steps accept more."""
        gen = torch.Generator().manual_seed(seed)
        mask = vocab - 1
        table = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * token_scale
        table[:, mask] = -30.0  # the MASK token is never a likely output
        pos_bias = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * pos_scale
        model = cls(table.to(device), pos_bias.to(device), temperature, top_k, top_p, mask)
        dev = model.table.device
        first_p = model.probs(model.logits(torch.tensor([[model.prompt_last]], device=dev),
                                           torch.tensor([[model.prompt_len - 1]], device=dev)))[0, 0]
        model.first = int(first_p.argmax())
        return model

    @property
    def vocab(self) -> int:
        return self.table.shape[0]

    def logits(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # the model: [B, R] -> [B, R, V]
        return (self.table[ids] + self.pos_bias[pos]).float()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        b, dev = logits.shape[0], logits.device
        return process_logits(logits.double(), torch.full((b,), self.temperature, dtype=torch.float64, device=dev),
                              torch.full((b,), self.top_k, device=dev),
                              torch.full((b,), self.top_p, dtype=torch.float64, device=dev))

    def next_probs(self, prefixes: list[tuple[int, ...]]) -> list[list[float]]:
        """AR's next-token distribution after each of ``prefixes`` (the tokens emitted so far, first one included)."""
        dev = self.table.device
        last = torch.tensor([[s[-1]] for s in prefixes], device=dev)
        pos = torch.tensor([[self.prompt_len + len(s) - 1] for s in prefixes], device=dev)
        return self.probs(self.logits(last, pos))[:, 0].tolist()

    def sampling(self, n: int) -> SamplingView:
        from idlm.inference.sglang_isd.stepper import SamplingView

        dev = self.table.device
        return SamplingView(torch.full((n,), self.temperature, device=dev), torch.full((n,), self.top_k, device=dev),
                            torch.full((n,), self.top_p, device=dev),
                            hints=BatchHints.of([self.temperature], [self.top_k], [self.top_p], self.vocab))


def bigram_stepper_samples(device: str, mode: str, n: int, stride: int = 3, tokens: int = 3, vocab: int = 9,
                           temperature: float = 1.0, top_k: int = 6, top_p: float = 0.95, seed: int = 0,
                           fused_verify: bool = False):
    """The SGLang ISD stepper (`ISDStateTable`) driving ``n`` copies of one request on a `BigramModel`. Returns (the
    first ``tokens`` tokens after the prefill's token of each request as tuples, the exact AR distribution of those
    tuples given that first token)."""
    from idlm.inference.sglang_isd.config import ISDServeConfig
    from idlm.inference.sglang_isd.stepper import ISDStateTable

    bigram = BigramModel.random(device, vocab, temperature, top_k, top_p, seed)
    mask, prompt_len, first = bigram.mask, bigram.prompt_len, bigram.first
    logits_of = bigram.logits
    cfg = ISDServeConfig(stride=stride, draft_mode=mode, seed=seed, fused_verify=fused_verify)
    state = ISDStateTable(n, cfg, mask, device, vocab_size=vocab)
    slots = torch.arange(n, device=device)
    state.on_prefill(slots, torch.full((n,), first, device=device))
    sampling = bigram.sampling(n)
    out = torch.full((n, tokens + stride), -1, dtype=torch.long, device=device)
    filled = torch.zeros(n, dtype=torch.long, device=device)
    seq_lens = torch.full((n,), prompt_len, dtype=torch.long, device=device)
    while int(filled.min()) < tokens:
        step = state.build(slots, seq_lens)
        res = state.commit(slots, step, logits_of(step.input_ids, step.position_ids), seq_lens, sampling)
        emitted = res.next_token_ids.view(n, -1)[:, :stride]
        for j in range(stride):
            take = (j < res.accept_lens.long()) & (filled < out.shape[1])
            out[take, filled[take]] = emitted[take, j]
            filled = filled + take.long()
        seq_lens = res.new_seq_lens
    samples = [tuple(r) for r in out[:, :tokens].tolist()]

    # exact: enumerate the AR chain after the first token
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(tokens):
        prefixes = list(exact)
        rows = bigram.next_probs([(first, *s) for s in prefixes])
        exact = {s + (v,): exact[s] * pv for s, row in zip(prefixes, rows) for v, pv in enumerate(row) if pv > 0}
    return samples, exact


def bigram_stepper_runs(bigram: BigramModel, n: int, finished: Callable[[int, list[int]], bool], stride: int = 3,
                        mode: str = "argmax", seed: int = 0, max_steps: int = 200) -> int:
    """The SGLang ISD stepper driving ``n`` copies of ``bigram``'s request, as SGLang's scheduler does: each step's
    emitted tokens of request i go to ``finished(i, tokens)`` (its first call gets the prefill's token alone), and a
    request leaves the batch once that returns True (its slot's state then goes stale, as in SGLang). Returns the
    number of decode steps."""
    from idlm.inference.sglang_isd.config import ISDServeConfig
    from idlm.inference.sglang_isd.stepper import ISDStateTable

    dev = bigram.table.device
    state = ISDStateTable(n, ISDServeConfig(stride=stride, draft_mode=mode, seed=seed), bigram.mask, dev,
                          vocab_size=bigram.vocab)
    slots = torch.arange(n, device=dev)
    state.on_prefill(slots, torch.full((n,), bigram.first, device=dev))
    seq_lens = torch.full((n,), bigram.prompt_len, dtype=torch.long, device=dev)
    active = [i for i in range(n) if not finished(i, [bigram.first])]
    steps = 0
    while active:
        if steps == max_steps:
            raise RuntimeError(f"{len(active)} requests still running after {max_steps} steps")
        at = torch.tensor(active, device=dev)
        step = state.build(slots[at], seq_lens[at])
        res = state.commit(slots[at], step, bigram.logits(step.input_ids, step.position_ids), seq_lens[at],
                           bigram.sampling(len(active)))
        seq_lens[at] = res.new_seq_lens
        emitted = res.next_token_ids.view(len(active), -1).tolist()
        lens = res.accept_lens.tolist()
        active = [i for i, row, k in zip(active, emitted, lens) if not finished(i, row[:k])]
        steps += 1
    return steps


def stop_lengths(outputs: list[list[int]], stop: int, max_new_tokens: int) -> list[int]:
    """The lengths ``outputs`` (sampled without a stop token) would have with ``stop`` as one: through its first
    occurrence, at most ``max_new_tokens``."""
    return [min(ids.index(stop) + 1 if stop in ids else len(ids), max_new_tokens) for ids in outputs]


def frequent_outcomes(samples: list, min_share: float) -> int:
    """How many distinct outcomes each make up at least ``min_share`` of ``samples``."""
    return sum(c >= min_share * len(samples) for c in Counter(samples).values())


def pick_stop_token(outputs: list[list[int]], max_new_tokens: int, min_early: float = 1 / 3,
                    min_share: float = 0.02) -> tuple[int | None, int]:
    """The token that, as a stop token, would spread the lengths of ``outputs`` (AR samples drawn without one) over
    the most values, among the tokens found past their first two positions that would end at least ``min_early``
    of them before ``max_new_tokens``: (token, how many lengths would each hold ``min_share`` of the outputs), or
    (None, 0) when no token ends enough of them early. Ties go to the token that ends more outputs early."""
    best: tuple[int, int, int | None] = (0, 0, None)
    for tok in sorted({t for ids in outputs for t in ids[2:]}):
        lengths = stop_lengths(outputs, tok, max_new_tokens)
        early = sum(x < max_new_tokens for x in lengths)
        if early < min_early * len(outputs):
            continue
        best = max(best, (frequent_outcomes(lengths, min_share), early, tok), key=lambda b: b[:2])
    return best[2], best[0]


def histogram(samples: list, top: int | None = None) -> str:
    """``samples`` counted, for assertion messages: every outcome in order, or the ``top`` most frequent (the rest
    summed)."""
    counts = Counter(samples).most_common()
    shown = sorted(counts) if top is None else counts[:top]
    text = ", ".join(f"{k}: {c}" for k, c in shown)
    rest = sum(c for _, c in counts[len(shown):])
    return "{" + text + (f", others: {rest}" if rest else "") + "}"
