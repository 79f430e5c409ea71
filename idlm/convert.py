"""`idlm convert`: turn a pretrained causal LM into an I-DLM checkpoint.

The architecture and weight layout do not change (strict causal attention needs none); the result is
the base model's weights, its tokenizer (plus a ``<|mask|>`` token) and an ``idlm`` block in config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from idlm.checkpoint import load_causal_lm, load_config, require_causal_lm
from idlm.config import IDLMConfig, ObjectiveConfig, check_stride, write_idlm_config
from idlm.errors import UserError

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"


@dataclass
class ConversionReport:
    output: str
    mask_token_id: int
    resized_embeddings: bool
    added_mask_token: bool
    num_embedding_rows: int

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _output_taken(output: Path) -> bool:
    """An existing file, or a non-empty directory."""
    return output.exists() and (not output.is_dir() or any(output.iterdir()))


def _check_output(output: Path, overwrite: bool) -> None:
    if _output_taken(output) and not overwrite:
        raise UserError(f"output directory {output} already exists; choose another or pass --overwrite")


def _mask_id_out_of_range(requested: int, num_rows: int) -> None:
    raise UserError(
        f"mask token id {requested} is outside the vocabulary: the model has {num_rows} embedding rows "
        f"(valid ids 0..{num_rows - 1})"
    )


def choose_mask_token(tokenizer, num_rows: int, requested: int | None) -> tuple[int, bool, bool]:
    """Pick the MASK id: (id, add_token_to_tokenizer, resize_embeddings).

    Order: an explicit ``requested`` id (must be an embedding row); an existing ``<|mask|>`` token; the first
    embedding row the tokenizer never produces (Qwen3: 151669); else a new token with one new row.
    """
    n_tok = len(tokenizer)
    if requested is not None:
        if not 0 <= requested < num_rows:
            _mask_id_out_of_range(requested, num_rows)
        if requested < n_tok:
            log.warning("mask token id %d is an existing token (%r) of the tokenizer",
                        requested, tokenizer.convert_ids_to_tokens(requested))
        return requested, requested == n_tok, False
    existing = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if isinstance(existing, int) and existing != tokenizer.unk_token_id and 0 <= existing < num_rows:
        return existing, False, False
    return n_tok, True, n_tok >= num_rows


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
    _check_output(out, overwrite)  # fail before the (slow) model load
    config = load_config(base, gguf_file)
    require_causal_lm(config, base)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if mask_token_id is not None and rows is not None and not 0 <= mask_token_id < rows:
        _mask_id_out_of_range(mask_token_id, rows)
    model, tokenizer = load_causal_lm(base, dtype=dtype, gguf_file=gguf_file)
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
    if _output_taken(out):  # --overwrite
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = ConversionReport(
        output=str(out),
        mask_token_id=mask_id,
        resized_embeddings=resize,
        added_mask_token=add_token,
        num_embedding_rows=num_rows,
    )
    (out / "idlm_conversion.json").write_text(json.dumps({"base": base, "gguf_file": gguf_file, **report.__dict__},
                                                         indent=2) + "\n")
    return report
