"""`idlm convert`: round trip through stock transformers, mask-token choice, errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idlm.checkpoint import idlm_config_of, load_idlm
from idlm.cli import main
from idlm.convert import MASK_TOKEN, convert
from idlm.errors import UserError


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


# ---------------------------------------------------------------------------------------------------------------
# hostile input: one line, exit 2, nothing deleted
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(argv, capsys, needle: str) -> None:
    code, lines = _run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, code, lines)


def _copy_base(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_output_never_destroys_the_base_or_its_neighbours(tiny_qwen3_dir, tmp_path, capsys):
    parent = tmp_path / "models"
    base = _copy_base(tiny_qwen3_dir, parent / "base")
    (parent / "notes.txt").write_text("keep me")
    before = _tree(parent)
    cases = [
        (str(base), "is the base model directory itself"),
        (str(parent), "contains the base model"),
        (str(tmp_path), "contains the base model"),
        (str(base / "sub"), "lies inside the base model directory"),
        (str(base / ".." / "base"), "is the base model directory itself"),
    ]
    for output, needle in cases:
        _refused(["convert", "--base", str(base), "--output", output, "--overwrite"], capsys, needle)
    link = tmp_path / "link-to-base"
    link.symlink_to(base)
    _refused(["convert", "--base", str(base), "--output", str(link), "--overwrite"], capsys, "base model directory")
    assert _tree(parent) == before


def test_overwrite_replaces_only_a_conversion_output_or_an_empty_directory(tiny_qwen3_dir, tmp_path, capsys):
    other = tmp_path / "my-data"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3"}))  # a model, but not an I-DLM one
    (other / "train.jsonl").write_text("{}\n")
    before = _tree(other)
    _refused(["convert", "--base", tiny_qwen3_dir, "--output", str(other), "--overwrite"], capsys,
             "replaces only an I-DLM checkpoint")
    assert _tree(other) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    _refused(["convert", "--base", tiny_qwen3_dir, "--output", str(afile), "--overwrite"], capsys,
             "is a file, not a directory")
    assert afile.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "--base", tiny_qwen3_dir, "--output", str(empty)]) == 0
    assert idlm_config_of(str(empty)).stride == 2
    # an earlier conversion is replaced whole; no temporary directory is left beside it
    (empty / "stale.bin").write_bytes(b"old")
    assert main(["convert", "--base", tiny_qwen3_dir, "--output", str(empty), "--overwrite", "--stride", "4"]) == 0
    assert idlm_config_of(str(empty)).stride == 4 and not (empty / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "empty", "my-data"]


def test_bad_output_paths_are_one_line(tiny_qwen3_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    cases = [
        (tmp_path / "afile" / "sub", "is a file, not a directory"),
        (tmp_path / "afile" / "a" / "b", "is a file, not a directory"),
        (tmp_path / "loop1", "symlink loop"),
        (tmp_path / "loop1" / "sub", "cannot resolve the path"),
    ]
    for output, needle in cases:
        _refused(["convert", "--base", tiny_qwen3_dir, "--output", str(output)], capsys, needle)


def test_broken_bases_are_one_line(tiny_qwen3_dir, tmp_path, capsys):
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((Path(tiny_qwen3_dir) / name).read_bytes())
    short_header = _copy_base(tiny_qwen3_dir, tmp_path / "short-header")
    (short_header / "model.safetensors").write_bytes((short_header / "model.safetensors").read_bytes()[:1000])
    short_data = _copy_base(tiny_qwen3_dir, tmp_path / "short-data")
    (short_data / "model.safetensors").write_bytes((short_data / "model.safetensors").read_bytes()[:-100])
    looped = _copy_base(tiny_qwen3_dir, tmp_path / "looped")
    (looped / "model.safetensors").unlink()
    (looped / "model.safetensors").symlink_to(looped / "model.safetensors")
    (tmp_path / "base-loop").symlink_to(tmp_path / "base-loop")
    cases = [
        (no_tok, "tokenizer files"),
        (short_header, "model.safetensors is truncated"),
        (short_data, "model.safetensors is truncated"),
        (looped, "cannot read"),
        (tmp_path / "base-loop", "model not found"),
    ]
    for i, (base, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        _refused(["convert", "--base", str(base), "--output", str(out)], capsys, needle)
        assert not out.exists()


def test_mask_id_must_not_be_a_used_token(tiny_qwen3_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3_dir)
    word = tok.convert_tokens_to_ids(tok.tokenize("the")[0])
    for mask_id, needle in [(tok.eos_token_id, "(eos)"), (tok.pad_token_id, "(pad)"), (word, "which text uses"),
                            (tok.convert_tokens_to_ids("<|im_start|>"), "which text uses")]:
        out = tmp_path / f"o{mask_id}"
        _refused(["convert", "--base", tiny_qwen3_dir, "--output", str(out), "--mask-token-id", str(mask_id)],
                 capsys, f"mask token id {mask_id} is the tokenizer's token")
        with pytest.raises(UserError, match=re.escape(needle)):
            convert(tiny_qwen3_dir, str(out), mask_token_id=mask_id)
        assert not out.exists()
    # a reserved special token the vocabulary sets aside (Llama 3 style) is a fine MASK
    base = _copy_base(tiny_qwen3_dir, tmp_path / "with-reserved")
    tok.add_special_tokens({"additional_special_tokens": ["<|reserved_special_token_0|>"]})
    tok.save_pretrained(base)
    reserved = tok.convert_tokens_to_ids("<|reserved_special_token_0|>")
    report = convert(str(base), str(tmp_path / "ok"), mask_token_id=reserved)
    assert report.mask_token_id == reserved and not report.added_mask_token
    # the default choice (the first unused row, as Qwen3's 151669) still works, and so does the row just past it
    assert convert(tiny_qwen3_dir, str(tmp_path / "default")).mask_token_id == len(tok) - 1
    assert convert(tiny_qwen3_dir, str(tmp_path / "free"), mask_token_id=len(tok) + 1).mask_token_id == len(tok) + 1


def test_stride_is_bounded(tiny_qwen3_dir, tmp_path, capsys):
    _refused(["convert", "--base", tiny_qwen3_dir, "--output", str(tmp_path / "o"), "--stride", "1000000000"],
             capsys, "<= 64")
    assert not (tmp_path / "o").exists()
