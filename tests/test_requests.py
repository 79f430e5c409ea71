"""The shared request rules (idlm/requests.py), safe JSON (idlm/jsonsafe.py), and the engine's per-request guard:
a request that breaks a batched step ends alone, the others finish exactly as if it had never been there."""

from __future__ import annotations

import math

import pytest

from idlm.cli import main
from idlm.config import MAX_STRIDE, IDLMConfig, check_stride
from idlm.errors import UserError
from idlm.inference.engine import ISDEngine, SamplingParams
from idlm.jsonsafe import MAX_DEPTH, JSONInputError, decode_at, loads
from idlm.requests import (
    InvalidRequest,
    check_sampling,
    check_seed,
    check_temperature,
    check_top_k,
    check_top_p,
    show,
)
from tests.helpers import tiny_model

VOCAB, MASK = 41, 40


# ---------------------------------------------------------------------------------------------------------------
# rules
@pytest.mark.parametrize("check,value", [
    (check_temperature, -0.1), (check_temperature, math.nan), (check_temperature, math.inf),
    (check_temperature, 1e308), (check_temperature, "0.5"), (check_temperature, True),
    (check_top_p, 0.0), (check_top_p, math.nan), (check_top_p, 1.5),
    (check_top_k, -1), (check_top_k, 2 ** 63), (check_top_k, 1.5), (check_top_k, False),
    (check_seed, 2 ** 63), (check_seed, -(2 ** 63) - 1), (check_seed, "7"),
])
def test_rules_refuse_with_the_field_named(check, value):
    with pytest.raises(InvalidRequest) as exc:
        check(value, name="--the-flag", param="the_field")
    assert exc.value.param == "the_field" and exc.value.message.startswith("--the-flag must be")
    assert isinstance(exc.value, ValueError)  # the engine's callers treat it as bad input


def test_rules_keep_valid_values():
    assert check_temperature(0) == 0.0 and check_temperature(100) == 100.0
    assert check_top_p(1) == 1.0 and check_top_k(2 ** 63 - 1) == 2 ** 63 - 1
    assert check_top_k(-1, minus_one_is_off=True) == 0 and check_top_k(0) == 0
    assert check_seed(None) is None and check_seed(-(2 ** 63)) == -(2 ** 63) and check_seed(2 ** 63 - 1) == 2 ** 63 - 1
    assert check_sampling(0.7, 0.9, 50, 1, 8) == {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9,
                                                  "top_k": 50, "seed": 1}


def test_messages_never_echo_huge_values():
    assert len(show(10 ** 5000)) < 60 and "digits" in show(10 ** 5000)  # str() of it would raise
    assert len(show("x" * 10_000)) < 60
    with pytest.raises(InvalidRequest) as exc:
        check_top_k(10 ** 5000)
    assert len(str(exc.value)) < 200


def test_stride_has_a_maximum_everywhere():
    check_stride(MAX_STRIDE)
    for bad in (1, MAX_STRIDE + 1, 1_000_000_000, True, 2.0):
        with pytest.raises(UserError, match=f"<= {MAX_STRIDE}"):
            check_stride(bad)
    with pytest.raises(UserError, match="stride"):
        IDLMConfig.from_dict({"mask_token_id": 5, "stride": 1_000_000_000})  # an old checkpoint with a huge stride
    model = tiny_model("qwen3", vocab_size=VOCAB, hidden_size=16, seed=0)
    with pytest.raises(ValueError, match=f"\\[1, {MAX_STRIDE}\\]"):
        ISDEngine(model, None, MAX_STRIDE + 1, MASK)


@pytest.mark.parametrize("extra,match", [
    (["--seed", str(2 ** 64)], "--seed must be an integer"),
    (["--top-k", str(2 ** 63)], "--top-k must be an integer"),
    (["--temperature", "nan"], "--temperature must be a number"),
    (["--temperature", "1e308"], "--temperature must be a number"),
    (["--top-p", "nan"], "--top-p must be in"),
])
def test_generate_uses_the_same_rules(tmp_path, capsys, extra, match):
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("idlm generate: error:") and match in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# JSON from untrusted text
def test_loads_reports_every_hostile_form():
    cases = {
        "syntax": "{oops",
        "depth": "[" * 50_000 + "]" * 50_000,
        "integer": "7" * 5000,
        "surrogate": '{"a": ["\\ud800"]}',
        "encoding": b'{"a": "\xff"}',
    }
    for kind, text in cases.items():
        with pytest.raises(JSONInputError) as exc:
            loads(text)
        assert exc.value.kind == kind, (kind, exc.value)
    with pytest.raises(JSONInputError) as exc:
        loads('{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}")  # deep, but below the recursion limit
    assert exc.value.kind == "depth" and exc.value.path == ("a",)
    with pytest.raises(JSONInputError) as exc:
        loads('{"m": [{"c": "ok"}, {"c": "\\udc00"}]}')
    assert exc.value.path == ("m", 1, "c")
    # valid input parses as json.loads does: surrogate pairs, NaN, nesting up to the limit
    assert loads('["\\ud83d\\ude00", NaN, 1e999]')[0] == "\U0001F600"
    assert loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None
    assert decode_at('[1, {"a": 2}]', 4) == ({"a": 2}, 12)


# ---------------------------------------------------------------------------------------------------------------
# the engine's per-request guard
@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", vocab_size=VOCAB, hidden_size=32, initializer_range=0.3, seed=3)


def _run_to_end(engine: ISDEngine, ids: list[str]) -> dict:
    final = {}
    while len(final) < len(ids):
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


GOOD = [([3, 7, 1], SamplingParams(max_new_tokens=14)),
        ([2, 9, 4], SamplingParams(max_new_tokens=11, temperature=0.9, top_k=20, seed=5))]


@pytest.fixture(scope="module")
def alone(model):
    """Each good request decoded on its own."""
    outs = []
    for prompt, params in GOOD:
        engine = ISDEngine(model, None, 3, MASK)
        rid = engine.add_request(prompt, params)
        outs.append(_run_to_end(engine, [rid])[rid].token_ids)
    return outs


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_request_that_breaks_a_step_ends_alone(model, alone, when):
    engine = ISDEngine(model, None, 3, MASK)
    ids = [engine.add_request(p, SamplingParams(**vars(sp))) for p, sp in GOOD]
    victim = SamplingParams(max_new_tokens=30, temperature=0.8, seed=1)
    bad = engine.add_request([5, 6], victim)  # valid when added
    if when == "decode":
        engine.step()  # all three prefilled and running
    victim.top_k = 2 ** 64  # past add_request's checks: the next batched step cannot build its tensors
    final = _run_to_end(engine, ids + [bad])
    assert final[bad].finish_reason == "error" and "Overflow" in final[bad].error
    assert [final[i].token_ids for i in ids] == alone  # greedy and seeded sampled requests: as if alone
    assert [final[i].finish_reason for i in ids] == ["length", "length"]
    assert not engine.has_unfinished()


def test_a_failing_single_request_leaves_the_engine_usable(model, alone):
    engine = ISDEngine(model, None, 3, MASK)
    victim = SamplingParams(max_new_tokens=5, temperature=0.8, seed=1)
    bad = engine.add_request([5, 6], victim)
    victim.top_k = 2 ** 64
    assert _run_to_end(engine, [bad])[bad].finish_reason == "error"
    rid = engine.add_request(*GOOD[0])
    assert _run_to_end(engine, [rid])[rid].token_ids == alone[0]
