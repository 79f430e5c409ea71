"""Checks of local training data before any process starts, and the small data paths of our own.

LlamaFactory silently drops rows it cannot use (and ``datasets`` reports a broken JSON line without its place), so
`idlm train` reads every local JSON/JSONL row first and stops at the first bad one with a one-line `UserError` that
names the file and the row (the line number for JSONL, the 1-based position in the array for JSON).

Formats (LlamaFactory's ``formatting`` of a dataset_info.json entry):

* ``sharegpt`` / ``openai``: a list of messages under the ``messages`` column (default ``conversations``), each with
  a role tag and a content tag (defaults ``from`` / ``value``, roles ``human`` / ``gpt`` / ``system``); user and
  assistant turns alternate after an optional system message, and the last one is a non-empty assistant response.
* ``alpaca``: ``instruction`` (prompt), optional ``input`` (query), non-empty ``output`` (response).

`train_file` (a recipe key) takes a JSON/JSONL file without a dataset_info.json: rows with ``messages`` of
``role``/``content`` (OpenAI style), ``conversations`` of ``from``/``value`` (ShareGPT), or
``instruction``/``output`` (Alpaca); the format is read from the first row. `pretokenized_file` takes rows of
``input_ids`` and ``labels`` (-100 on unsupervised positions) and is saved as a tokenized dataset that LlamaFactory
loads through its ``tokenized_path``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idlm.errors import UserError
from idlm.jsonsafe import JSONInputError, decode_at, loads
from idlm.requests import show
from idlm.training.recipe import DATA_INFO_NAME

IGNORE_INDEX = -100
MAX_TOKEN_ID = 2 ** 31 - 1  # stored as int64 by `datasets`; real vocabularies are far smaller
JSON_SUFFIXES = (".json", ".jsonl")

SHAREGPT_DEFAULTS = {
    "messages": "conversations",
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_STYLE = {
    "messages": "messages",
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "function_call",
    "system_tag": "system",
}
ALPACA_DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}


# ---------------------------------------------------------------------------------------------------------------
# Reading rows with their place


def _row_error(where: str, exc: JSONInputError) -> UserError:
    if exc.kind == "syntax":
        return UserError(f"{where}: not JSON ({exc.message})")
    return UserError(f"{where}: {exc.message}")


NEWLINE = b"\n"


def _not_utf8(raw: bytes, exc: UnicodeDecodeError, where: str) -> UserError:
    return UserError(f"{where}: not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1}); "
                     "data files must be UTF-8")


def _array_rows(path: Path, raw: bytes) -> Iterator[tuple[int, Any]]:
    """The rows of a JSON array, decoded one at a time so that an error names its row."""
    bad, bad_at = None, -1  # the first byte that is not UTF-8, and its character offset in the decoded text
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # decode anyway (the byte becomes a lone surrogate) to find its row
        bad, text = exc, raw.decode("utf-8-sig", errors="surrogateescape")
        bad_at = len(raw[:exc.start].decode("utf-8-sig"))

    def bad_byte_before(upto: int, n: int | None) -> None:
        """An error at or after the bad byte is the bad byte's fault: report that instead."""
        if bad is not None and bad_at <= upto:
            where = f"row {n}" if n else f"line {raw.count(NEWLINE, 0, bad.start) + 1}"
            raise _not_utf8(raw, bad, f"{path} {where}")

    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end() + 1  # past "["
    pos = ws.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        n = 0
        while True:
            n += 1
            start = pos
            try:
                row, pos = decode_at(text, pos)
            except JSONInputError as exc:
                bad_byte_before(len(text) if exc.pos is None else exc.pos, n if bad_at >= start else None)
                raise _row_error(f"{path} row {n}", exc) from None
            bad_byte_before(pos - 1, n)
            yield n, row
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            bad_byte_before(pos, None)
            raise UserError(f"{path} row {n}: not JSON (expected ',' or ']' after the row)")
    bad_byte_before(len(text), None)
    if ws.match(text, pos).end() != len(text):
        raise UserError(f"{path}: not JSON (extra data after the closing ']')")


def iter_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(row number, parsed row) of a JSON array file or a JSON-lines file; UserError at the first unreadable row.

    Rows are read by `idlm.jsonsafe`: bytes that are not UTF-8, nesting deeper than its limit, huge integer literals
    and lone surrogates stop at their row like any other malformed row."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        with path.open("rb") as fh:
            text_start = fh.read(4096).lstrip()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    as_array = path.suffix == ".json" and text_start.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    if as_array:
        yield from _array_rows(path, path.read_bytes())
        return
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(raw, exc, f"{path} row {n}") from None
            if not line.strip():
                continue
            try:
                row = loads(line)
            except JSONInputError as exc:
                raise _row_error(f"{path} row {n}", exc) from None
            yield n, row


# ---------------------------------------------------------------------------------------------------------------
# Row checks


def _check_conversation(row: Any, attr: dict[str, Any], where: str) -> None:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    col = attr["messages"]
    if col not in row:
        raise UserError(f"{where}: missing field {col!r}")
    messages = row[col]
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {col!r} must be a non-empty list of messages")
    role_tag, content_tag = attr["role_tag"], attr["content_tag"]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or role_tag not in m or content_tag not in m:
            raise UserError(f"{where}: message {i} needs {role_tag!r} and {content_tag!r}")
        if not isinstance(m[role_tag], str):
            raise UserError(f"{where}: message {i} has a {type(m[role_tag]).__name__} as {role_tag!r} (a role name "
                            "is text)")
        if not isinstance(m[content_tag], str):
            raise UserError(f"{where}: message {i} has non-text {content_tag!r}")
    turns = messages
    if attr.get("system_tag") and turns[0][role_tag] == attr["system_tag"]:
        turns = turns[1:]
    odd = {attr["user_tag"], attr.get("observation_tag")}
    even = {attr["assistant_tag"], attr.get("function_tag")}
    for i, m in enumerate(turns):
        want = odd if i % 2 == 0 else even
        if m[role_tag] not in want:
            expected = attr["user_tag"] if i % 2 == 0 else attr["assistant_tag"]
            raise UserError(f"{where}: turn {i} has role {show(m[role_tag])}, expected {expected!r} "
                            "(user and assistant turns alternate)")
    if len(turns) % 2 != 0 or not turns:
        raise UserError(f"{where}: the conversation must end with an {attr['assistant_tag']!r} response")
    if not turns[-1][content_tag].strip():
        raise UserError(f"{where}: empty response (the last {attr['assistant_tag']!r} message has no text)")


def _check_alpaca(row: Any, attr: dict[str, Any], where: str) -> None:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object")
    for key in ("prompt", "response"):
        col = attr[key]
        if col not in row:
            raise UserError(f"{where}: missing field {col!r}")
        if not isinstance(row[col], str):
            raise UserError(f"{where}: field {col!r} must be text")
    if not row[attr["response"]].strip():
        raise UserError(f"{where}: empty response (field {attr['response']!r})")
    q = attr.get("query")
    if q and q in row and row[q] is not None and not isinstance(row[q], str):
        raise UserError(f"{where}: field {q!r} must be text")


def check_file(path: str | Path, formatting: str, attr: dict[str, Any]) -> int:
    """Check every row; returns the number of rows."""
    check = _check_alpaca if formatting == "alpaca" else _check_conversation
    count = 0
    for n, row in iter_rows(path):
        check(row, attr, f"{path} row {n}")
        count += 1
    if count == 0:
        raise UserError(f"{path}: no rows")
    return count


def entry_attrs(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(formatting, column/tag names) of a dataset_info.json entry, with LlamaFactory's defaults."""
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise UserError(f"unknown dataset formatting {formatting!r} (alpaca, sharegpt or openai)")
    if formatting == "alpaca":
        attr = dict(ALPACA_DEFAULTS)
    else:
        attr = dict(SHAREGPT_DEFAULTS)
    attr.update({k: v for k, v in (entry.get("columns") or {}).items() if k in attr or k == "system"})
    attr.update({k: v for k, v in (entry.get("tags") or {}).items()})
    return formatting, attr


def _local_files(dataset_dir: str, file_name: str) -> list[Path]:
    p = Path(dataset_dir) / file_name
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.is_file())
    if p.is_file():
        return [p]
    raise UserError(f"data file not found: {p}")


def check_dataset_dir(dataset_dir: str, names: list[str]) -> int:
    """Check the local files of the named entries of ``dataset_dir/dataset_info.json``; hub entries are skipped."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    if not info_path.is_file():
        raise UserError(f"{dataset_dir} has no dataset_info.json (needed for 'dataset'; or use 'train_file')")
    try:
        info = loads(info_path.read_bytes())
    except JSONInputError as exc:
        raise _row_error(str(info_path), exc) from None
    except OSError as exc:
        raise UserError(f"cannot read {info_path}: {exc.strerror or exc}") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_path}: must be a JSON object of dataset entries")
    total = 0
    for name in names:
        if name not in info:
            raise UserError(f"dataset {name!r} is not defined in {info_path}")
        entry = info[name]
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k) or {}, dict) for k in ("columns", "tags")):
            raise UserError(f"{info_path}: entry {name!r} must be an object (with 'columns' and 'tags' objects)")
        if "file_name" not in entry:
            continue  # hub, script or cloud data: read by LlamaFactory itself
        if entry.get("ranking"):
            raise UserError(f"dataset {name!r} is a ranking (preference) dataset; I-DLM training needs SFT data")
        formatting, attr = entry_attrs(entry)
        for f in _local_files(dataset_dir, entry["file_name"]):
            if f.suffix in JSON_SUFFIXES:
                total += check_file(f, formatting, attr)
    return total


# ---------------------------------------------------------------------------------------------------------------
# train_file: a local chat file without dataset_info.json


def detect_format(path: str | Path) -> tuple[str, dict[str, Any]]:
    for n, row in iter_rows(path):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object")
        if "messages" in row:
            return "sharegpt", dict(OPENAI_STYLE)
        if "conversations" in row:
            return "sharegpt", dict(SHAREGPT_DEFAULTS)
        if "instruction" in row or "output" in row:
            return "alpaca", dict(ALPACA_DEFAULTS)
        raise UserError(f"{where}: missing field 'messages' (or 'conversations', or 'instruction'/'output')")
    raise UserError(f"{path}: no rows")


def dataset_info_entry(path: str, formatting: str, attr: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"file_name": path, "formatting": formatting}
    if formatting == "alpaca":
        entry["columns"] = {k: attr[k] for k in ("prompt", "query", "response") if attr.get(k)}
    else:
        entry["columns"] = {"messages": attr["messages"]}
        entry["tags"] = {k: attr[k] for k in ("role_tag", "content_tag", "user_tag", "assistant_tag",
                                              "observation_tag", "function_tag", "system_tag")}
    return entry


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_train_file(file: str, dataset_dir: str, name: str, validate: bool = True) -> None:
    """Check ``file`` and write ``dataset_dir/dataset_info.json`` with one entry ``name`` pointing at it."""
    formatting, attr = detect_format(file)
    if validate:
        check_file(file, formatting, attr)
    info = {name: dataset_info_entry(str(Path(file).resolve()), formatting, attr)}
    _write_atomic(Path(dataset_dir) / "dataset_info.json", json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# pretokenized_file


def read_pretokenized(path: str | Path, cutoff_len: int) -> dict[str, list[list[int]]]:
    """Columns input_ids / attention_mask / labels from a JSONL of {"input_ids", "labels"} rows (cut to cutoff_len)."""
    cols: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for n, row in iter_rows(path):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object")
        for key in ("input_ids", "labels"):
            if key not in row:
                raise UserError(f"{where}: missing field {key!r}")
            v = row[key]
            if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise UserError(f"{where}: {key!r} must be a list of integers")
        ids, labels = row["input_ids"], row["labels"]
        if not ids:
            raise UserError(f"{where}: 'input_ids' is empty")
        if len(ids) != len(labels):
            raise UserError(f"{where}: 'input_ids' ({len(ids)}) and 'labels' ({len(labels)}) differ in length")
        if any(t < 0 for t in ids) or any(t < 0 and t != IGNORE_INDEX for t in labels):
            raise UserError(f"{where}: negative token id (labels use -100 for unsupervised positions)")
        if any(t > MAX_TOKEN_ID for t in ids) or any(t > MAX_TOKEN_ID for t in labels):
            raise UserError(f"{where}: token id above {MAX_TOKEN_ID} (no vocabulary is that large)")
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(t == IGNORE_INDEX for t in labels):
            raise UserError(f"{where}: no supervised token (every label is -100) within cutoff_len {cutoff_len}")
        cols["input_ids"].append(ids)
        cols["attention_mask"].append([1] * len(ids))
        cols["labels"].append(labels)
    if not cols["input_ids"]:
        raise UserError(f"{path}: no rows")
    return cols


def build_pretokenized(file: str, out_path: str, cutoff_len: int) -> None:
    """Save ``file`` as a DatasetDict({"train": ...}) at ``out_path`` (LlamaFactory's tokenized_path), atomically."""
    if Path(out_path).is_dir() and any(Path(out_path).iterdir()):
        return
    from datasets import Dataset, DatasetDict

    cols = read_pretokenized(file, cutoff_len)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    DatasetDict({"train": Dataset.from_dict(cols)}).save_to_disk(tmp)
    os.replace(tmp, out_path)


def check_plan_data(plan) -> None:
    """Validate and prepare every local data source of a plan (run before any process starts)."""
    for c in plan.data_checks:
        if c["kind"] == "train_file":
            prepare_train_file(c["file"], c["dataset_dir"], DATA_INFO_NAME, validate=c["validate"])
        elif c["kind"] == "dataset" and c["validate"]:
            check_dataset_dir(c["dataset_dir"], c["names"])
    if plan.pretokenized:
        p = plan.pretokenized
        build_pretokenized(p["file"], p["path"], p["cutoff_len"])

