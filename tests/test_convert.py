"""`idlm convert`: round trip through stock transformers, mask-token choice, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idlm.checkpoint import idlm_config_of, load_idlm
from idlm.cli import main
from idlm.convert import MASK_TOKEN, convert


def _state(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_qwen3_round_trip(tiny_qwen3_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "idlm"
    report = convert(tiny_qwen3_dir, str(out), stride=3)
    base_tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    # Qwen3-style: the first embedding row the tokenizer never produces (151669 for real Qwen3)
    assert report.mask_token_id == len(base_tok)
    assert not report.resized_embeddings
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["idlm"]["mask_token_id"] == report.mask_token_id and cfg["idlm"]["stride"] == 3
    assert "auto_map" not in cfg and cfg["architectures"] == ["Qwen3ForCausalLM"]
    # same weights, tensor for tensor
    base_state, new_state = _state(tiny_qwen3_dir), _state(str(out))
    assert base_state.keys() == new_state.keys()
    for k in base_state:
        assert torch.equal(base_state[k], new_state[k]), k
    # loads with stock transformers (no remote code) and gives the base model's AR logits
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir).eval()
    conv = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, len(base_tok), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(ids).logits, conv(ids).logits)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == report.mask_token_id
    assert tok.decode([report.mask_token_id]) == MASK_TOKEN
    # and through our own loader
    _, _, idlm_cfg = load_idlm(str(out))
    assert idlm_cfg == idlm_config_of(str(out)) and idlm_cfg.block_size == 2


def test_llama_without_free_row_gets_new_token(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "idlm"
    report = convert(tiny_llama_dir, str(out), stride=4)
    base_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert report.resized_embeddings and report.added_mask_token
    assert report.mask_token_id == len(base_tok) and report.num_embedding_rows == len(base_tok) + 1
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    conv = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert conv.config.tie_word_embeddings
    ids = torch.randint(0, len(base_tok), (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = base(ids).logits, conv(ids).logits
    assert b.shape[-1] == a.shape[-1] + 1
    torch.testing.assert_close(b[..., :-1], a, rtol=0, atol=0)


def test_explicit_mask_id(tiny_qwen3_dir, tmp_path):
    report = convert(tiny_qwen3_dir, str(tmp_path / "o"), mask_token_id=390)
    assert report.mask_token_id == 390 and idlm_config_of(str(tmp_path / "o")).mask_token_id == 390


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in err if "error" in line]


def test_cli_errors_are_one_line_exit_2(tiny_qwen3_dir, tmp_path, capsys):
    from transformers import T5Config

    t5 = tmp_path / "t5"
    T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2).save_pretrained(t5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = {
        "model not found": ["convert", "--base", str(tmp_path / "missing"), "--output", str(tmp_path / "a")],
        "no config.json": ["convert", "--base", str(tmp_path), "--output", str(tmp_path / "b")],
        "not a causal language model": ["convert", "--base", str(t5), "--output", str(tmp_path / "c")],
        "stride must be": ["convert", "--base", tiny_qwen3_dir, "--output", str(tmp_path / "d"), "--stride", "1"],
        "outside the vocabulary": ["convert", "--base", tiny_qwen3_dir, "--output", str(tmp_path / "e"),
                                   "--mask-token-id", "100000"],
        "already exists": ["convert", "--base", tiny_qwen3_dir, "--output", str(tmp_path / "taken")],
    }
    for needle, argv in cases.items():
        code, lines = _run_cli(argv, capsys)
        assert code == 2, needle
        assert len(lines) == 1 and needle in lines[0], (needle, lines)
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    # argparse-level errors: one line too, same exit code
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--base", tiny_qwen3_dir, "--output", str(tmp_path / "f"), "--stride", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_overwrite_and_json(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["convert", "--base", tiny_qwen3_dir, "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out)
    assert main(["convert", "--base", tiny_qwen3_dir, "--output", str(out), "--overwrite", "--stride", "5"]) == 0
    assert idlm_config_of(str(out)).stride == 5


def test_entry_point_help_and_exit_code(tmp_path):
    help_out = subprocess.run([sys.executable, "-m", "idlm", "--help"], capture_output=True, text=True, check=True)
    assert "convert" in help_out.stdout
    bad = subprocess.run([sys.executable, "-m", "idlm", "convert", "--base", str(tmp_path / "nope"),
                          "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "model not found" in bad.stderr
