"""Hostile training-data rows stop with the file and row named, one line, exit 2: in the native loader
(`load_chat_jsonl`) and in the `idlm train` pre-flight check (training/datacheck.py), for JSONL and JSON arrays."""

from __future__ import annotations

import json

import pytest

from idlm.cli import main as cli_main
from idlm.errors import UserError
from idlm.training.data import load_chat_jsonl
from idlm.training.datacheck import OPENAI_STYLE, SHAREGPT_DEFAULTS, check_dataset_dir, check_file
from idlm.training.recipe import PLAN_FILE
from tests.helpers import write_recipe

GOOD = json.dumps({"messages": [{"role": "user", "content": "What is 1 plus 2?"},
                                {"role": "assistant", "content": "3"}]}).encode()





# (bad row as bytes, words of the error)
HOSTILE_ROWS = {
    "role-list": (json.dumps({"messages": [{"role": ["user"], "content": "hi"},
                                           {"role": "assistant", "content": "x"}]}).encode(), ["message 0", "list"]),
    "role-object": (json.dumps({"messages": [{"role": {"name": "user"}, "content": "hi"},
                                             {"role": "assistant", "content": "x"}]}).encode(), ["message 0", "dict"]),
    "not-utf8": (GOOD.replace(b"What", b"Wh\xff\xfeat"), ["not UTF-8", "0xff"]),
    "deep": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["nests deeper than"]),
    "deep-below-recursion-limit": (b'{"messages": [' + b"[" * 300 + b"]" * 300 + b"]}", ["nests deeper than"]),
    "huge-integer": (b'{"messages": [], "n": ' + b"9" * 5000 + b"}", ["5000 digits"]),
    "lone-surrogate": (GOOD.replace(b"What", b"\\ud800What"), ["surrogate", "messages[0].content"]),
}


def _jsonl(tmp_path, bad: bytes):
    f = tmp_path / "chat.jsonl"
    f.write_bytes(GOOD + b"\n\n" + bad + b"\n" + GOOD + b"\n")
    return f  # the bad row is row 3


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_native_loader_names_file_and_row(tmp_path, name):
    bad, words = HOSTILE_ROWS[name]
    f = _jsonl(tmp_path, bad)
    with pytest.raises(UserError) as exc:
        load_chat_jsonl(f)
    message = str(exc.value)
    assert message.startswith(f"{f} row 3:") and "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_train_preflight_names_file_and_row(tmp_path, fake_idlm_model, capsys, name):
    bad, words = HOSTILE_ROWS[name]
    f = _jsonl(tmp_path, bad)
    recipe = write_recipe(tmp_path, {"model_name_or_path": fake_idlm_model, "train_file": str(f), "stride": 2,
                                "output_dir": str(tmp_path / "out")})
    rc = cli_main(["train", recipe])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{f} row 3:" in err[0], err
    for word in words:
        assert word in err[0], err
    assert not (tmp_path / "out" / PLAN_FILE).exists()  # nothing started


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_json_array_rows_are_named(tmp_path, name):
    bad, words = HOSTILE_ROWS[name]
    f = tmp_path / "chat.json"
    f.write_bytes(b"[" + GOOD + b",\n " + GOOD + b",\n" + bad + b"\n]")
    with pytest.raises(UserError) as exc:
        check_file(f, "sharegpt", dict(OPENAI_STYLE))
    message = str(exc.value)
    assert message.startswith(f"{f} row 3:") and "\n" not in message, message
    for word in words:
        assert word in message, message


def test_sharegpt_role_tag_as_a_list(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]})
                 + "\n")
    with pytest.raises(UserError, match=f"{f} row 1: message 0 has a list as 'from'"):
        check_file(f, "sharegpt", dict(SHAREGPT_DEFAULTS))


def test_json_array_reading_keeps_valid_files_and_names_bad_syntax(tmp_path):
    f = tmp_path / "chat.json"
    f.write_bytes(b"\xef\xbb\xbf [ " + GOOD + b" ,\n" + GOOD + b" ] \n")  # a BOM and spacing are fine
    assert check_file(f, "sharegpt", dict(OPENAI_STYLE)) == 2
    f.write_bytes(b"[" + GOOD + b",\n" + GOOD[:-2] + b"]")
    with pytest.raises(UserError, match="row 2: not JSON"):
        check_file(f, "sharegpt", dict(OPENAI_STYLE))
    f.write_bytes(b"[" + GOOD + b"] extra")
    with pytest.raises(UserError, match="extra data"):
        check_file(f, "sharegpt", dict(OPENAI_STYLE))
    f.write_bytes(b"[" + GOOD + b"\xff, " + GOOD + b"]")  # the bad byte between rows: its line is named
    with pytest.raises(UserError, match="line 1: not UTF-8"):
        check_file(f, "sharegpt", dict(OPENAI_STYLE))


def test_hostile_dataset_info(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for body, needle in [(b"[" * 100_000, "nests deeper"), (b"\xff{}", "not UTF-8"), (b"[]", "JSON object"),
                         (b'{"mine": ["file_name"]}', "entry 'mine' must be an object"),
                         (b'{"mine": {"file_name": "x.json", "columns": [1]}}', "entry 'mine' must be an object")]:
        (d / "dataset_info.json").write_bytes(body)
        with pytest.raises(UserError, match=needle):
            check_dataset_dir(str(d), ["mine"])


def test_pretokenized_token_ids_are_bounded(tmp_path):
    from idlm.training.datacheck import read_pretokenized

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input_ids": [1, 2 ** 40], "labels": [1, 2]}) + "\n")
    with pytest.raises(UserError, match=f"{f} row 1: token id above"):
        read_pretokenized(f, cutoff_len=8)
