"""Engine-independent references for the ISD tests: naive AR decoding, exact AR distributions, a G test."""

from __future__ import annotations

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

