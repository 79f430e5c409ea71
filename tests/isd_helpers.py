"""Engine-independent references for the ISD tests: naive AR decoding, exact AR distributions, a G test."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from idlm.sampling import process_logits


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


def bigram_stepper_samples(device: str, mode: str, n: int, stride: int = 3, tokens: int = 3, vocab: int = 9,
                           temperature: float = 1.0, top_k: int = 6, top_p: float = 0.95, seed: int = 0,
                           fused_verify: bool = False):
    """The SGLang ISD stepper (`ISDStateTable`) driving ``n`` copies of one request on a bigram model (the logits
    of a row depend on its input token and position only: the KV cache is implicit), at the paper's kind of
    sampling (temperature with top-k and top-p both set). Returns (the first ``tokens`` tokens after the prefill's
    token of each request as tuples, the exact AR distribution of those tuples given that first token)."""
    from idlm.inference.sglang_isd.config import ISDServeConfig
    from idlm.inference.sglang_isd.stepper import ISDStateTable, SamplingView
    from idlm.sampling import BatchHints

    gen = torch.Generator().manual_seed(seed)
    mask = vocab - 1
    table = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 1.5
    table[:, mask] = -30.0  # the MASK token is never a likely output
    pos_bias = torch.randn(64, vocab, generator=gen, dtype=torch.float64) * 0.5
    table, pos_bias = table.to(device), pos_bias.to(device)
    prompt_last, prompt_len = 2, 5

    def logits_of(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # the model: [B, R] -> [B, R, V]
        return (table[ids] + pos_bias[pos]).float()

    def probs_of(logits: torch.Tensor) -> torch.Tensor:
        b = logits.shape[0]
        return process_logits(logits.double(), torch.full((b,), temperature, dtype=torch.float64, device=device),
                              torch.full((b,), top_k, device=device),
                              torch.full((b,), top_p, dtype=torch.float64, device=device))

    first_p = probs_of(logits_of(torch.tensor([[prompt_last]], device=device), torch.tensor([[prompt_len - 1]],
                                                                                               device=device)))[0, 0]
    # condition on one first token (SGLang's sampler draws it): every request then shares the prompt's cache
    first = int(first_p.argmax())
    cfg = ISDServeConfig(stride=stride, draft_mode=mode, seed=seed, fused_verify=fused_verify)
    state = ISDStateTable(n, cfg, mask, device, vocab_size=vocab)
    slots = torch.arange(n, device=device)
    state.on_prefill(slots, torch.full((n,), first, device=device))
    sampling = SamplingView(torch.full((n,), temperature, device=device), torch.full((n,), top_k, device=device),
                            torch.full((n,), top_p, device=device),
                            hints=BatchHints.of([temperature], [top_k], [top_p], vocab))
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

    # exact: enumerate the AR chain after the first token (position prompt_len is the first token's)
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for i in range(tokens):
        prefixes = list(exact)
        last = torch.tensor([[s[-1] if s else first] for s in prefixes], device=device)
        pos = torch.full_like(last, prompt_len + i)
        rows = probs_of(logits_of(last, pos))[:, 0].tolist()
        exact = {s + (v,): exact[s] * pv for s, row in zip(prefixes, rows) for v, pv in enumerate(row) if pv > 0}
    return samples, exact
