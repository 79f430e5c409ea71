"""The reference ISD engine on random tiny float64 models.

Greedy ISD must reproduce naive greedy AR decoding token for token (any stride, any batch composition); sampled ISD
must follow the exact AR distribution (a G test against enumeration); the KV cache must hold exactly the committed
tokens after every step.
"""

from __future__ import annotations

import pytest
import torch

from idlm.adaptive import AdaptiveStride, StepCostTable
from idlm.inference.engine import ISDEngine, SamplingParams
from idlm.isd import ISDStats
from tests.helpers import tiny_model
from tests.isd_helpers import (
    exact_ar_distribution,
    g_test,
    naive_greedy,
    one_torch_thread,  # noqa: F401  (autouse fixture)
)

VOCAB, MASK = 41, 40  # the last row is the MASK input
PROMPTS = [[3], [7, 1], [2, 9, 4, 4, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19], [5] * 12, [39, 0, 20], [8, 6, 8, 6]]
MAX_NEW = [12, 7, 15, 1, 10, 13, 9]


@pytest.fixture(scope="module")
def model():
    # init 0.3: sharp enough next-token distributions; the untrained MASK rows draft mostly wrong tokens
    return tiny_model("qwen3", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=3)


@pytest.fixture(scope="module")
def greedy_refs(model):
    return [naive_greedy(model, p, n) for p, n in zip(PROMPTS, MAX_NEW)]


def _run(engine: ISDEngine, prompts, params, join_after: int = 0, first: int | None = None):
    """Add ``first`` requests, step ``join_after`` times, add the rest, run to the end.
    Returns (final outputs in prompt order, per-request stats)."""
    first = len(prompts) if first is None else first
    ids: list[str] = []
    stats: list[ISDStats] = []
    final = {}

    def add(i):
        ids.append(engine.add_request(prompts[i], params[i]))
        stats.append(engine.request_stats(ids[-1]))

    def collect(outs):
        for out in outs:
            if out.finished:
                final[out.request_id] = out

    for i in range(first):
        add(i)
    for _ in range(join_after):
        collect(engine.step())
    for i in range(first, len(prompts)):
        add(i)
    while engine.has_unfinished():
        collect(engine.step())
    return [final[i] for i in ids], stats


@pytest.mark.parametrize("stride,max_batch,first,join_after", [
    (1, 3, 3, 2), (2, 3, 3, 2), (3, 2, 2, 1), (3, 16, 7, 0), (4, 3, 4, 3), (5, 16, 2, 2),
])
def test_greedy_isd_equals_naive_ar(model, greedy_refs, stride, max_batch, first, join_after):
    engine = ISDEngine(model, None, stride, MASK, max_batch_size=max_batch)
    params = [SamplingParams(max_new_tokens=n) for n in MAX_NEW]
    outs, stats = _run(engine, PROMPTS, params, join_after=join_after, first=first)
    for out, ref, prompt in zip(outs, greedy_refs, PROMPTS):
        assert out.token_ids == ref
        assert out.finished and out.finish_reason == "length" and out.prompt_tokens == len(prompt)
        assert out.tpf == pytest.approx((len(out.token_ids) - 1) / out.forwards if out.forwards else 0.0)
        if stride == 1 and out.forwards:
            assert out.tpf == 1.0
        assert len(out.acceptance) == stride - 1
    if stride > 1:  # both paths ran: drafts were rejected and accepted
        assert sum(s.rejections for s in stats) > 0
        assert sum(s.accepted[0] for s in stats) > 0
    else:
        assert all(o.forwards == len(o.token_ids) - 1 for o in outs)  # the first token comes from the prefill
    assert not engine.has_unfinished() and engine._cache.batch_size == 0


def test_greedy_eager_llama_and_mixed_batch(greedy_refs, model):
    """A Llama with eager attention (additive float mask) and greedy requests among sampled ones."""
    llama = tiny_model("llama", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=5)
    llama.set_attn_implementation("eager")
    refs = [naive_greedy(llama, p, 10) for p in PROMPTS[:4]]
    engine = ISDEngine(llama, None, 3, MASK, max_batch_size=8)
    params = [SamplingParams(max_new_tokens=10, temperature=1.0 if i % 2 else 0.0, seed=i) for i in range(8)]
    outs = engine.generate(PROMPTS[:4] * 2, params)
    for i, out in enumerate(outs):
        if params[i].temperature == 0:
            assert out.token_ids == refs[i % 4]


def test_stop_tokens_and_length(model, greedy_refs):
    engine = ISDEngine(model, None, 3, MASK)
    ref = greedy_refs[2]  # 15 tokens
    stop = ref[6]
    want = ref[:ref.index(stop) + 1]
    out = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=15, stop_token_ids=(stop, 10**6)))[0]
    assert out.token_ids == want and out.finish_reason == "stop"
    first = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=15, stop_token_ids=(ref[0],)))[0]
    assert first.token_ids == ref[:1] and first.finish_reason == "stop" and first.forwards == 0
    short = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4))[0]
    assert short.token_ids == ref[:4] and short.finish_reason == "length"


def test_step_outputs_stream_the_tokens(model, greedy_refs):
    engine = ISDEngine(model, None, 4, MASK)
    rid = engine.add_request(PROMPTS[4], SamplingParams(max_new_tokens=10))
    streamed: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            streamed += out.new_token_ids
            assert out.token_ids == streamed
    assert streamed == greedy_refs[4]


def test_kv_cache_holds_exactly_the_committed_tokens(model):
    engine = ISDEngine(model, None, 3, MASK, max_batch_size=4)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=30, temperature=1.0, seed=i))
           for i, p in enumerate(PROMPTS[:4])]
    checked = 0
    for _ in range(6):
        engine.step()
        for rid in ids:
            if rid not in engine._requests:
                continue
            tokens = engine.cached_tokens(rid)
            kv = engine.request_kv(rid)
            with torch.no_grad():
                fresh = model(input_ids=torch.tensor([tokens]), use_cache=True).past_key_values
            assert len(kv) == len(fresh.layers)
            for (keys, values), layer in zip(kv, fresh.layers):
                assert keys.shape[1] == len(tokens)
                torch.testing.assert_close(keys, layer.keys[0], rtol=0, atol=1e-10)
                torch.testing.assert_close(values, layer.values[0], rtol=0, atol=1e-10)
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_seeded_sampling_does_not_depend_on_the_batch(model, mode):
    target = SamplingParams(max_new_tokens=14, temperature=1.0, top_p=0.95, seed=123, draft_mode=mode)
    alone = ISDEngine(model, None, 3, MASK).generate([PROMPTS[3]], target)[0].token_ids
    engine = ISDEngine(model, None, 3, MASK, max_batch_size=3)
    others = [SamplingParams(max_new_tokens=9, temperature=0.7, seed=5), SamplingParams(max_new_tokens=3),
              SamplingParams(max_new_tokens=20, temperature=1.5, seed=9, draft_mode="argmax")]
    outs, _ = _run(engine, [PROMPTS[0], PROMPTS[3], PROMPTS[4], PROMPTS[5]],
                   [others[0], target, others[1], others[2]], join_after=1, first=1)
    assert outs[1].token_ids == alone
    reseeded = [ISDEngine(model, None, 3, MASK).generate([PROMPTS[3]], SamplingParams(
        max_new_tokens=14, temperature=1.0, top_p=0.95, seed=s, draft_mode=mode))[0].token_ids for s in (1, 2, 3)]
    assert any(r != alone for r in reseeded)


def test_abort(model, greedy_refs):
    engine = ISDEngine(model, None, 3, MASK, max_batch_size=2)
    keep = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=15))
    running = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=12))
    waiting = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=7))
    engine.step()
    engine.abort(running)
    engine.abort(waiting)
    engine.abort("no-such-request")
    outs = {o.request_id: o for o in engine.step()}
    assert outs[running].finish_reason == "abort" and outs[waiting].finish_reason == "abort"
    assert outs[running].finished and outs[waiting].token_ids == []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
            final = out
    assert final.token_ids == greedy_refs[2]


def test_add_request_validation(model):
    engine = ISDEngine(model, None, 3, MASK, max_context=40)
    assert engine.max_context == 40
    ok = SamplingParams(max_new_tokens=4)
    cases = [
        ([], ok, "empty"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1] * 30, SamplingParams(max_new_tokens=7), "context of 40"),
        ([VOCAB], ok, "outside the vocabulary"),
        ([1], SamplingParams(temperature=-1.0), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_k=-2), "top_k"),
        ([1], SamplingParams(draft_mode="greedy"), "draft mode"),
        ([1], SamplingParams(draft_temperature=0.0), "draft_temperature"),
    ]
    for prompt, params, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.add_request(prompt, params)
    engine.add_request([1] * 30, SamplingParams(max_new_tokens=6), request_id="a")  # 30 + 6 + 4 = 40 fits
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], ok, request_id="a")
    with pytest.raises(ValueError, match="stride"):
        ISDEngine(model, None, 0, MASK)
    with pytest.raises(ValueError, match="mask token"):
        ISDEngine(model, None, 2, None)
    with pytest.raises(ValueError, match="mask token"):
        ISDEngine(model, None, 2, VOCAB)
    assert ISDEngine(model, None, 1, None).stride == 1


# ---------------------------------------------------------------------------------------------------------------
# Sampled ISD follows the AR distribution

DIST_VOCAB, DIST_MASK, DIST_PROMPT, DIST_TOKENS = 9, 8, [1, 2, 3], 4
ALPHA = 1e-3  # false-alarm rate of each distribution test


@pytest.fixture(scope="module")
def dist_model():
    # init 0.5: peaked distributions whose MASK-row drafts are often accepted, so both paths are well exercised
    return tiny_model("qwen3", vocab_size=DIST_VOCAB, hidden_size=32, initializer_range=0.5, seed=0)


def _isd_samples(model, stride: int, n: int, mode: str, seed0: int = 0, **kw):
    """``n`` ISD samples of the first DIST_TOKENS tokens (one batch, a seed per request) and the summed stats."""
    engine = ISDEngine(model, None, stride, DIST_MASK, max_batch_size=n)
    params = [SamplingParams(max_new_tokens=DIST_TOKENS, seed=seed0 + i, draft_mode=mode, **kw) for i in range(n)]
    ids = [engine.add_request(DIST_PROMPT, p) for p in params]
    stats = [engine.request_stats(rid) for rid in ids]  # live objects: they fill in as the requests run
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step() if o.finished})
    total = ISDStats(stride)
    for s in stats:
        total.merge(s)
    return [tuple(final[rid].token_ids) for rid in ids], total


@pytest.fixture(scope="module")
def exact_t1(dist_model):
    return exact_ar_distribution(dist_model, DIST_PROMPT, DIST_TOKENS, temperature=1.0)


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_sampled_isd_follows_the_ar_distribution(dist_model, exact_t1, mode):
    samples, stats = _isd_samples(dist_model, 3, 4000, mode, temperature=1.0)
    p_value, df = g_test(exact_t1, samples)
    assert df >= 40  # enough cells for the test to have power
    assert p_value > ALPHA, f"{mode}: G test p = {p_value:.2e} over {df} dof"
    # tokens 3 and 4 come from verified drafts; both accept and reject happened at both positions
    assert all(0.1 < a < 0.95 for a in stats.acceptance) and stats.attempted[1] > 1000


@pytest.mark.parametrize("draft_temperature", [0.4, 2.0])
def test_sharpened_or_flattened_drafts_keep_the_ar_distribution(dist_model, exact_t1, draft_temperature):
    """Drafts drawn at temperature * draft_temperature are judged against that distribution: still exact."""
    samples, stats = _isd_samples(dist_model, 3, 4000, "sample", seed0=30_000, temperature=1.0,
                                  draft_temperature=draft_temperature)
    p_value, df = g_test(exact_t1, samples)
    assert df >= 40
    assert p_value > ALPHA, f"draft temperature {draft_temperature}: G test p = {p_value:.2e} over {df} dof"
    assert all(0.05 < a < 0.95 for a in stats.acceptance)


def test_draft_temperature_changes_the_drafts_not_greedy_output(dist_model):
    """A sharper draft distribution accepts differently at temperature 1; greedy requests ignore it."""
    _, base = _isd_samples(dist_model, 3, 1500, "sample", seed0=40_000, temperature=1.0)
    _, sharp = _isd_samples(dist_model, 3, 1500, "sample", seed0=40_000, temperature=1.0, draft_temperature=0.3)
    assert base.acceptance != sharp.acceptance
    g1, _ = _isd_samples(dist_model, 3, 4, "sample", temperature=0.0)
    g2, _ = _isd_samples(dist_model, 3, 4, "sample", temperature=0.0, draft_temperature=0.3)
    assert g1 == g2


def test_paper_argmax_rule_fails_the_distribution_test(dist_model, exact_t1):
    samples, _ = _isd_samples(dist_model, 3, 3000, "paper_argmax", temperature=1.0)
    p_value, df = g_test(exact_t1, samples)
    assert p_value < 1e-12, f"paper_argmax should be detectably biased, got p = {p_value:.2e} ({df} dof)"


@pytest.mark.parametrize("stride,mode,processing", [
    (4, "sample", dict(temperature=0.8, top_k=4, top_p=0.9)),
    (4, "argmax", dict(temperature=1.3, top_p=0.8)),
    (3, "sample", dict(temperature=0.6, top_k=3)),
])
def test_processed_sampling_follows_processed_ar(dist_model, stride, mode, processing):
    exact = exact_ar_distribution(dist_model, DIST_PROMPT, DIST_TOKENS, **processing)
    samples, stats = _isd_samples(dist_model, stride, 3000, mode, seed0=10_000, **processing)
    p_value, df = g_test(exact, samples)
    assert df >= 10
    assert p_value > ALPHA, f"{mode} {processing}: G test p = {p_value:.2e} over {df} dof"
    assert 0.1 < stats.acceptance[0] < 0.95


def test_pooled_tpf_weights_requests_by_their_decode_forwards():
    from idlm.inference.engine import RequestOutput, pooled_tpf

    def out(forwards, tpf):
        return RequestOutput("r", [], [], True, "length", 1, forwards, tpf, [])

    # 10 forwards at TPF 3 and 30 at TPF 1: (30 + 30) / 40 tokens per forward; the mean per request would be 2
    assert pooled_tpf([out(10, 3.0), out(30, 1.0)]) == 1.5
    assert pooled_tpf([out(0, 0.0)]) == 0.0  # prefill only: no decode forwards


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_cpu_decode_pads_rows_to_a_multiple_of_eight_without_changing_outputs(model, greedy_refs, stride):
    """On a CPU a decode forward carries batch x rows padded to a multiple of 8 (MASK rows after the real ones; CPU
    matmuls are slow off a multiple of 8), and the outputs stay greedy AR's; seeded sampled outputs are the same
    with and without the padding."""
    widths = []  # (batch, rows) of every decode forward

    padded = ISDEngine(model, None, stride, MASK, max_batch_size=1)
    step_width = padded._step_width

    def spy(need, batch, n, context):
        widths.append((batch, step_width(need, batch, n, context)))
        return widths[-1][1]
    padded._step_width = spy
    for prompt, n, ref in zip(PROMPTS[:4], MAX_NEW[:4], greedy_refs[:4]):
        out = padded.generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0))[0]
        assert out.token_ids == ref
    assert widths and all(b * r % 8 == 0 for b, r in widths), widths

    plain = ISDEngine(model, None, stride, MASK, max_batch_size=1)
    plain._step_width = lambda need, batch, n, context: need
    sampled = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(4)]
    assert [o.token_ids for o in padded.generate(PROMPTS[:4], sampled)] == \
           [o.token_ids for o in plain.generate(PROMPTS[:4], sampled)]


# ---------------------------------------------------------------------------------------------------------------
# Load-adaptive stride: N changes between steps, outputs keep their distribution


class _CyclingStride(AdaptiveStride):
    """A policy that runs the strides of ``cycle`` in turn (every transition between them, whatever the load)."""

    def __init__(self, max_stride: int, cycle: list[int]):
        rows = tuple(2 * n - 1 for n in range(1, max_stride + 1))
        super().__init__(max_stride, StepCostTable((1,), rows, ((1.0,) * len(rows),)))
        self.cycle, self.steps = cycle, 0

    def choose(self, batch: int) -> int:
        n = self.cycle[self.steps % len(self.cycle)]
        self.steps += 1
        self.chosen[n] = self.chosen.get(n, 0) + 1
        return n


def test_greedy_with_a_changing_stride_equals_naive_ar(dist_model, model):
    prompts = [[1, 2, 3], [4], [5, 6, 7, 0, 1], [2, 2], [7, 1, 3, 3, 3, 6]]
    refs = [naive_greedy(dist_model, p, 24) for p in prompts]
    policy = _CyclingStride(4, [4, 2, 1, 3, 4, 4, 2, 3, 1])
    engine = ISDEngine(dist_model, None, 4, DIST_MASK, max_batch_size=3, stride_policy=policy)
    outs, stats = _run(engine, prompts, [SamplingParams(max_new_tokens=24)] * len(prompts), join_after=2, first=3)
    assert [o.token_ids for o in outs] == refs
    assert set(policy.chosen) == {1, 2, 3, 4}
    # drafts were accepted and rejected at several positions, across the stride changes
    assert sum(s.accepted[1] for s in stats) > 0 and sum(s.rejections for s in stats) > 0
    with pytest.raises(ValueError, match="max_stride"):
        ISDEngine(model, None, 3, MASK, stride_policy=policy)


@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_sampled_isd_with_a_changing_stride_follows_the_ar_distribution(dist_model, exact_t1, mode):
    n = 3000
    engine = ISDEngine(dist_model, None, 4, DIST_MASK, max_batch_size=n, stride_policy=_CyclingStride(4, [4, 2, 3, 1]))
    params = [SamplingParams(max_new_tokens=DIST_TOKENS, seed=20_000 + i, draft_mode=mode, temperature=1.0)
              for i in range(n)]
    outs = engine.generate([DIST_PROMPT] * n, params)
    p_value, df = g_test(exact_t1, [tuple(o.token_ids) for o in outs])
    assert df >= 40 and p_value > ALPHA, f"{mode}: G test p = {p_value:.2e} over {df} dof"


def test_adaptive_stride_in_the_engine_follows_the_cost_table(model, greedy_refs):
    """With a cost table where every extra row costs as much as the first, the policy runs AR (N = 1); where rows
    are free, it runs the largest N. Outputs are the AR outputs either way, and the policy learns acceptance."""
    rows = (1, 3, 5, 7)
    for per_row, want in ((1.0, {1}), (0.0, {4})):
        table = StepCostTable((1, 16), rows, tuple(tuple(1.0 + per_row * r for r in rows) for _ in range(2)))
        policy = AdaptiveStride(4, table, explore_every=0)  # the choice alone (exploration: tests/test_adaptive.py)
        engine = ISDEngine(model, None, 4, MASK, max_batch_size=8, stride_policy=policy)
        outs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW])
        assert [o.token_ids for o in outs] == greedy_refs
        assert set(policy.chosen) == want
    assert policy.acceptance != [0.5, 0.5, 0.5]  # the N = 4 run observed its drafts


def test_measure_step_costs_gives_a_table_the_policy_takes(model, greedy_refs):
    engine = ISDEngine(model, None, 3, MASK, max_batch_size=4)
    table = engine.measure_step_costs([1, 4, 2], context=16, reps=1)
    assert table.batch_sizes == (1, 2, 4) and table.rows == (1, 3, 5)
    assert all(s > 0 for row in table.seconds for s in row)
    engine.stride_policy = AdaptiveStride(3, table)
    assert engine._cache.batch_size == 0  # the measurement left no state behind
    outs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in MAX_NEW])
    assert [o.token_ids for o in outs] == greedy_refs and sum(engine.stride_policy.chosen.values()) > 0
