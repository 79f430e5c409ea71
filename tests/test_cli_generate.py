"""`idlm generate` on a tiny converted checkpoint: text, --json fields, greedy = AR, one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.chat import encode_prompt, stop_token_ids
from idlm.cli import main
from idlm.convert import convert
from idlm.lora import save_gated_lora
from idlm.tiny import build_tiny_model
from tests.isd_helpers import (
    naive_greedy,
    one_torch_thread,  # noqa: F401  (autouse fixture)
)

PROMPT = "What is 2 plus 3?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_generate")
    # float64 with a wide init: sharp, tie-free logits, so greedy output can be compared token for token
    model, tokenizer = build_tiny_model(root / "base", free_rows=4, dtype=torch.float64, init_std=0.3, seed=2)
    convert(base=str(root / "base"), output=str(root / "idlm"), stride=3)
    save_gated_lora(str(root / "base"), root / "adapter", stride=2, rank=2, init_std=0.2)
    return {"base": str(root / "base"), "idlm": str(root / "idlm"), "adapter": str(root / "adapter"),
            "model": model, "tokenizer": tokenizer}


def _run(capsys, *argv: str):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _reference(dirs, max_new: int, chat: bool = True) -> list[int]:
    tok, model = dirs["tokenizer"], dirs["model"]
    return naive_greedy(model, encode_prompt(tok, PROMPT, chat_template=chat), max_new,
                        stop=stop_token_ids(tok, model))


def test_generate_prints_text(dirs, capsys):
    code, out, err = _run(capsys, "--model", dirs["idlm"], "--prompt", PROMPT, "--max-new-tokens", "10")
    assert code == 0, err
    code, js, _ = _run(capsys, "--model", dirs["idlm"], "--prompt", PROMPT, "--max-new-tokens", "10", "--json")
    assert out == json.loads(js)["text"] + "\n"


def test_generate_json_fields_and_greedy_equals_ar(dirs, capsys):
    code, out, err = _run(capsys, "--model", dirs["idlm"], "--prompt", PROMPT, "--max-new-tokens", "12", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {"text", "tokens", "tpf", "acceptance", "forwards"} <= set(data)
    assert data["stride"] == 3 and len(data["acceptance"]) == 2
    assert data["tokens"] == _reference(dirs, 12)
    assert data["text"] == dirs["tokenizer"].decode(data["tokens"], skip_special_tokens=True)
    assert data["tpf"] == pytest.approx((len(data["tokens"]) - 1) / data["forwards"])


def test_generate_strides_templates_sampling_and_lora(dirs, capsys):
    base = ["--prompt", PROMPT, "--max-new-tokens", "9", "--json"]
    code, out, err = _run(capsys, "--model", dirs["idlm"], *base, "--stride", "1", "--no-chat-template")
    assert code == 0, err
    assert json.loads(out)["tokens"] == _reference(dirs, 9, chat=False)
    sampled = ["--model", dirs["idlm"], *base, "--temperature", "1.0", "--top-p", "0.9", "--top-k", "20",
               "--seed", "4", "--draft-mode", "argmax"]
    first = json.loads(_run(capsys, *sampled)[1])["tokens"]
    assert first == json.loads(_run(capsys, *sampled)[1])["tokens"]
    code, out, err = _run(capsys, "--model", dirs["base"], "--lora", dirs["adapter"], *base)  # R-ISD, stride 2
    assert code == 0, err
    data = json.loads(out)
    assert data["stride"] == 2 and data["tokens"] == _reference(dirs, 9)


@pytest.mark.parametrize("extra,match", [
    (["--stride", "0"], "--stride must be an integer in [1, 64]"),
    (["--stride", "65"], "--stride must be an integer in [1, 64]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
])
def test_generate_bad_arguments(dirs, capsys, extra, match):
    code, out, err = _run(capsys, "--model", dirs["idlm"], "--prompt", PROMPT, *extra)
    assert code == 2 and out == ""
    assert err.startswith("idlm generate: error:") and match in err and err.count("\n") == 1


def test_generate_bad_model(dirs, capsys, tmp_path):
    code, _, err = _run(capsys, "--model", str(tmp_path / "nope"), "--prompt", PROMPT)
    assert code == 2 and "model not found" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "--model", dirs["base"], "--prompt", PROMPT)  # plain AR model without --stride 1
    assert code == 2 and "not an I-DLM checkpoint" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "--model", dirs["base"], "--prompt", PROMPT, "--lora", str(tmp_path))
    assert code == 2 and "gated-LoRA adapter" in err and err.count("\n") == 1
    code, _, err = _run(capsys, "--model", dirs["idlm"], "--prompt", PROMPT, "--max-new-tokens", "5000")
    last = err.strip().split("\n")[-1]  # after the model's loading progress bar
    assert code == 2 and last.startswith("idlm generate: error:") and "exceeds the model's context" in last
