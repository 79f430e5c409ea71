"""`idlm convert`: turn a pretrained causal LM into an I-DLM checkpoint.

The architecture and weight layout do not change (strict causal attention needs none); the result is
the base model's weights, its tokenizer (plus a ``<|mask|>`` token) and an ``idlm`` block in config.json.

Every check of the user's input runs before the (slow) model load and stops with a one-line `UserError`: the output
must not be the base, contain it or lie inside it; ``--overwrite`` replaces only an earlier I-DLM checkpoint or an
empty directory; the base needs a real tokenizer and readable weights; an explicit MASK id must not be a token the
tokenizer uses (a reserved/unused special token is fine). The checkpoint is written to a temporary sibling directory
and moved into place when complete, so a failed or interrupted run leaves an existing output as it was.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from idlm.checkpoint import load_causal_lm, load_config, require_causal_lm
from idlm.config import IDLM_CONFIG_KEY, IDLMConfig, ObjectiveConfig, check_stride, write_idlm_config
from idlm.errors import UserError

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
TMP_PREFIX = ".idlm-convert-"  # + "<pid>-<output name>": the temporary directory beside the output
# Special tokens a vocabulary sets aside for later use (Llama 3's <|reserved_special_token_N|>, Gemma's <unusedN>):
# safe MASK ids even though the tokenizer assigns them.
RESERVED_TOKEN = re.compile(r"reserved|unused", re.IGNORECASE)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclass
class ConversionReport:
    output: str
    mask_token_id: int
    resized_embeddings: bool
    added_mask_token: bool
    num_embedding_rows: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


# ------------------------------------------------------------------------------------------------ the output path
def _resolve(path: Path, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise UserError(f"{what} {path}: cannot resolve the path ({exc})") from None


def _is_idlm_checkpoint(directory: Path) -> bool:
    """A directory holding an I-DLM checkpoint: a config.json with an ``idlm`` block (as convert and train write)."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and isinstance(config.get(IDLM_CONFIG_KEY), dict)


def check_output(output: Path, base: str, overwrite: bool) -> Path:
    """The resolved directory to write, after refusing every output that would destroy something else."""
    if output.is_symlink() and not output.exists():
        raise UserError(f"--output {output} is a dangling symbolic link or a symlink loop")
    target = _resolve(output, "--output")
    base_path = Path(base)
    if base_path.exists():
        base_dir = _resolve(base_path, "--base")
        if target == base_dir:
            raise UserError(f"--output {output} is the base model directory itself; choose a new directory")
        if target in base_dir.parents:
            raise UserError(f"--output {output} contains the base model {base}; choose a directory beside it")
        if base_dir in target.parents:
            raise UserError(f"--output {output} lies inside the base model directory {base}; choose one outside it")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--output {output}: {ancestor} is a file, not a directory")
    if target.exists():
        if not target.is_dir():
            raise UserError(f"--output {output} is a file, not a directory; choose a directory path")
        if any(target.iterdir()):
            if not overwrite:
                raise UserError(f"output directory {output} already exists; choose another or pass --overwrite")
            if not _is_idlm_checkpoint(target):
                raise UserError(f"--overwrite replaces only an I-DLM checkpoint (a config.json with an 'idlm' block) "
                                f"or an empty directory; {output} is neither, so it is left as it is")
    return target


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary directories of earlier runs for this output whose process is gone (killed mid-write)."""
    for tmp in target.parent.glob(f"{TMP_PREFIX}*-{target.name}"):
        pid = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ------------------------------------------------------------------------------------------------ the base model
def check_safetensors(path: Path) -> None:
    """Refuse a .safetensors file whose header is unreadable or whose data is shorter than the header says."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path} is truncated ({size} bytes, not even a safetensors header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise UserError(f"{path} is truncated or not a safetensors file (its header claims {header_len} "
                                f"bytes, the file has {size})")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt: its safetensors header is not a JSON object")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2 and isinstance(v["data_offsets"][1], int)]
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        raise UserError(f"{path} is truncated: {size} bytes, its header describes {need}")


def _check_base_files(base: str, gguf_file: str | None) -> None:
    directory = Path(base)
    if not directory.is_dir() or gguf_file is not None:
        return
    for f in sorted(directory.glob("*.safetensors")):
        check_safetensors(f)


def _one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def _load_tokenizer(base: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, gguf_file=gguf_file)
    except Exception as exc:  # transformers raises OSError/ValueError/... with long texts
        raise UserError(f"cannot load the tokenizer of {base}: {_one_line(exc)}") from exc


def check_tokenizer(tokenizer, num_rows: int | None, base: str) -> None:
    """Refuse a stand-in tokenizer: transformers builds a near-empty one when the tokenizer files are missing."""
    n = len(tokenizer)
    if num_rows is not None and 2 * n < num_rows:
        raise UserError(f"the tokenizer of {base} has {n} token(s) for the model's {num_rows} embedding rows: its "
                        "tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...) are missing or incomplete")


def _role_ids(tokenizer, config) -> dict[int, str]:
    """Ids with a role no MASK may take: eos, pad, bos, unk of the tokenizer and the config's eos/pad/bos ids."""
    roles: dict[int, str] = {}
    for name in ("eos", "pad", "bos", "unk"):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(value, int):
            roles.setdefault(value, name)
    for source in (config, getattr(config, "get_text_config", lambda: None)()):
        for name in ("eos", "pad", "bos"):
            value = getattr(source, f"{name}_token_id", None)
            for v in value if isinstance(value, list | tuple) else [value]:
                if isinstance(v, int):
                    roles.setdefault(v, name)
    return roles


def check_requested_mask_id(tokenizer, config, requested: int, num_rows: int) -> None:
    """An explicit MASK id must be an embedding row that no text maps to: a row beyond the tokenizer, a hole in its
    vocabulary, its existing <|mask|> token, or a reserved/unused special token."""
    if not 0 <= requested < num_rows:
        _mask_id_out_of_range(requested, num_rows)
    token = tokenizer.convert_ids_to_tokens(requested) if requested < len(tokenizer) else None
    roles = _role_ids(tokenizer, config)
    if token == MASK_TOKEN and requested not in roles:
        return
    assigned = requested in set(tokenizer.get_vocab().values()) or requested in set(tokenizer.all_special_ids)
    if requested in roles or (assigned and not (isinstance(token, str) and RESERVED_TOKEN.search(token))):
        role = f" ({roles[requested]})" if requested in roles else ""
        free = f" (ids {len(tokenizer)}..{num_rows - 1})" if len(tokenizer) < num_rows else ""
        raise UserError(f"mask token id {requested} is the tokenizer's token {token!r}{role}, which text uses: choose "
                        f"an unused row{free} or a reserved special token, or leave --mask-token-id out")


def _mask_id_out_of_range(requested: int, num_rows: int) -> None:
    raise UserError(
        f"mask token id {requested} is outside the vocabulary: the model has {num_rows} embedding rows "
        f"(valid ids 0..{num_rows - 1})"
    )


def choose_mask_token(tokenizer, num_rows: int, requested: int | None) -> tuple[int, bool, bool]:
    """Pick the MASK id: (id, add_token_to_tokenizer, resize_embeddings).

    Order: an explicit ``requested`` id (checked by `check_requested_mask_id`); an existing ``<|mask|>`` token; the
    first embedding row the tokenizer never produces (Qwen3: 151669); else a new token with one new row.
    """
    n_tok = len(tokenizer)
    if requested is not None:
        if not 0 <= requested < num_rows:
            _mask_id_out_of_range(requested, num_rows)
        return requested, requested == n_tok, False
    existing = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if isinstance(existing, int) and existing != tokenizer.unk_token_id and 0 <= existing < num_rows:
        return existing, False, False
    return n_tok, True, n_tok >= num_rows


# ------------------------------------------------------------------------------------------------ conversion
def convert(
    base: str,
    output: str,
    stride: int = 2,
    mask_token_id: int | None = None,
    objective: ObjectiveConfig | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert ``base`` (directory or hub id) into an I-DLM checkpoint in ``output``."""
    check_stride(stride)
    out = Path(output)
    config = load_config(base, gguf_file)
    require_causal_lm(config, base)
    target = check_output(out, base, overwrite)  # every check runs before the (slow) model load
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if mask_token_id is not None and rows is not None and not 0 <= mask_token_id < rows:
        _mask_id_out_of_range(mask_token_id, rows)
    _check_base_files(base, gguf_file)
    tokenizer = _load_tokenizer(base, gguf_file)
    check_tokenizer(tokenizer, rows, base)
    if mask_token_id is not None and rows is not None:
        check_requested_mask_id(tokenizer, config, mask_token_id, rows)
    try:
        model, tokenizer = load_causal_lm(base, dtype=dtype, gguf_file=gguf_file)
    except UserError:
        raise
    except Exception as exc:  # a corrupt weight file, a missing shard, ...: one line, not a traceback
        raise UserError(f"cannot load the model weights from {base}: {_one_line(exc)}") from exc
    num_rows = model.get_input_embeddings().weight.shape[0]
    mask_id, add_token, resize = choose_mask_token(tokenizer, num_rows, mask_token_id)
    if add_token:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True)
        got = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        if got != mask_id:
            raise RuntimeError(f"tokenizer gave {MASK_TOKEN} id {got}, expected {mask_id}")
    if add_token or tokenizer.convert_ids_to_tokens(mask_id) == MASK_TOKEN:
        tokenizer.mask_token = MASK_TOKEN
    if resize:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=True)
        num_rows = model.get_input_embeddings().weight.shape[0]
    cfg = IDLMConfig(mask_token_id=mask_id, stride=stride, objective=objective or ObjectiveConfig())
    write_idlm_config(model.config, cfg)
    model.config.mask_token_id = mask_id
    report = ConversionReport(
        output=str(out),
        mask_token_id=mask_id,
        resized_embeddings=resize,
        added_mask_token=add_token,
        num_embedding_rows=num_rows,
    )
    try:
        _write(model, tokenizer, target, {"base": base, "gguf_file": gguf_file, **report.__dict__})
    except OSError as exc:
        raise UserError(f"cannot write the checkpoint to {output}: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if exc.filename else "")) from exc
    return report


def _write(model, tokenizer, target: Path, record: dict) -> None:
    """Save into a temporary sibling directory, then move it into place (replacing an earlier checkpoint)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = target.parent / f"{TMP_PREFIX}{os.getpid()}-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # written last: its presence marks a finished conversion (scripts/convert_qwen3_to_idlm.sh waits for it)
        (tmp / "idlm_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():  # an empty directory or an earlier I-DLM checkpoint (check_output)
            old = target.parent / f"{TMP_PREFIX}{os.getpid()}-old-{target.name}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
