"""Training recipes: a LlamaFactory-style YAML file plus the I-DLM keys, resolved into one plan of stages.

A recipe is a flat mapping of LlamaFactory / HF ``TrainingArguments`` keys (``model_name_or_path``, ``dataset``,
``template``, ``cutoff_len``, ``learning_rate``, ``deepspeed``, ``output_dir`` ...) plus the keys in `IDLM_KEYS`
(``stride``, ``alpha``, ``auto_balance``, ``stages`` ...). ``stages`` is a list of mappings; each stage starts from
the previous stage's weights and overrides any key of the top level (its own schedule, stride, loss weights).

`resolve_recipe` turns (file, ``key=value`` overrides) into a `Plan`: per stage, the exact argument dictionary
handed to LlamaFactory's parser and the I-DLM settings, with paths made absolute. It raises `UserError` (one line)
for anything wrong that can be known before a process is started.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from idlm.config import ObjectiveConfig, check_stride
from idlm.errors import UserError
from idlm.training.curriculum import STAGE_DONE_FILE, is_stage_done, stage_dir_name

__all__ = ["STAGE_DONE_FILE", "Plan", "Stage", "StageSettings", "resolve_recipe", "stage_done"]

# Keys that belong to I-DLM (never passed to LlamaFactory's parser).
IDLM_KEYS = {
    "stride",  # N of the stage (N - 1 masks per block)
    "alpha",  # weight of the clean loss (relative weight under auto_balance)
    "auto_balance",  # w = alpha * CE_noisy / CE_clean of the previous optimizer step
    "block_align",  # response | sequence
    "stages",  # list of per-stage overrides (the stride curriculum)
    "attn_implementation",  # sdpa | eager | flex_attention, set on the model after loading
    "compile_layers",  # torch.compile each decoder layer (idlm.training.compile; default false)
    "finetuning",  # full | gated_lora
    "mask_token_id",  # gated_lora on a plain AR base: the MASK row (default: first free embedding row)
    "train_file",  # a local JSON/JSONL chat file (no dataset_info.json needed)
    "pretokenized_file",  # a local JSONL of {"input_ids": [...], "labels": [...]} rows
    "validate_data",  # check every local data row before starting (default true)
    "peak_tflops",  # per-device peak for MFU (default: known GPUs; none on CPU)
    "launcher",  # torchrun | deepspeed
    "nproc_per_node",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "log_file",  # JSONL of loss components per logging step (default OUTPUT_DIR/train_log.jsonl)
    "trainer",  # llamafactory (default) | idlm (idlm.training.loop: the project's own loop, one process)
    "teacher",  # distillation teacher (default: the first stage's model, i.e. the model before conversion)
    "distill_kl",  # weight of KL(teacher || model) on the clean half
    "distill_soft",  # share of the teacher's soft targets in the noisy half
    "distill_accept",  # weight of the acceptance gap 1 - sum min(p, q) against the teacher on the noisy half
    "mask_token",  # gated_lora: the MASK input as a token string of the base tokenizer (instead of mask_token_id)
    "work_dir",  # where the pipeline's shared products go (base, converted, generated data); default output_dir
    "base",  # pipeline: the AR model to convert (section; idlm.training.pipeline)
    "generate",  # pipeline: the base model's sampled responses as training data (section)
    "adapter",  # pipeline: a gated-LoRA stage on the base after the curriculum (section)
    "evaluate",  # pipeline: the evaluation hooks after training (section)
}

# Recipe sections (mappings) of the pipeline, run by idlm.training.pipeline around the stages.
SECTIONS = ("base", "generate", "adapter", "evaluate")
TRAINERS = ("llamafactory", "idlm")

# Short spellings accepted in recipes -> LlamaFactory / HF names.
ALIASES = {
    "lr": "learning_rate",
    "schedule": "lr_scheduler_type",
    "optimizer": "optim",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "model": "model_name_or_path",
}

# Keys the plan sets itself; a recipe may not change them.
FIXED = {"stage": "sft", "do_train": True}

# Defaults that differ from LlamaFactory's / HF's.
DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "ddp_timeout": 180000000,
    "save_only_model": False,  # resuming needs optimizer and scheduler states
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 2,
    "flash_attn": "sdpa",  # LlamaFactory's loader; flex_attention is set afterwards (attn_implementation)
}

DATA_INFO_NAME = "idlm_train_file"
PLAN_FILE = "idlm_plan.json"


@dataclass
class StageSettings:
    """The I-DLM side of one stage."""

    index: int  # 1-based
    stride: int
    alpha: float
    auto_balance: bool
    block_align: str
    finetuning: str  # full | gated_lora
    attn_implementation: str | None
    mask_token_id: int | None
    output_dir: str
    peak_tflops: float | None
    compile_layers: bool = False
    trainer: str = "llamafactory"
    distill_kl: float = 0.0
    distill_soft: float = 0.0
    distill_accept: float = 0.0
    teacher: str | None = None  # path (or hub id) of the frozen teacher when a distill_* weight is > 0
    mask_token: str | None = None  # gated_lora: MASK given as a token string

    def objective(self) -> ObjectiveConfig:
        """This stage's objective settings (one place for both trainers)."""
        return ObjectiveConfig(alpha=self.alpha, auto_balance=self.auto_balance, block_align=self.block_align,
                               distill_kl=self.distill_kl, distill_soft=self.distill_soft,
                               distill_accept=self.distill_accept)


@dataclass
class Stage:
    settings: StageSettings
    lf_args: dict[str, Any]  # handed to llamafactory.hparams.get_train_args


@dataclass
class Launch:
    launcher: str  # torchrun | deepspeed | none
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None
    hostfile: str | None = None


@dataclass
class Plan:
    recipe: str
    output_dir: str
    log_file: str
    stages: list[Stage]
    launch: Launch
    data_checks: list[dict[str, Any]] = field(default_factory=list)  # files to validate (see datacheck)
    pretokenized: dict[str, Any] | None = None  # {"file": ..., "path": ...} to build before launching
    work_dir: str = ""  # shared products of the pipeline (base, converted, generated data)
    sections: dict[str, Any] = field(default_factory=dict)  # base / generate / evaluate, paths made absolute

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        stages = [Stage(StageSettings(**s["settings"]), s["lf_args"]) for s in raw.pop("stages")]
        launch = Launch(**raw.pop("launch"))
        return cls(stages=stages, launch=launch, **raw)


# ---------------------------------------------------------------------------------------------------------------
# Reading and merging


def load_recipe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key=value`` (value read as YAML); ``stages.I.key=value`` sets a key of stage I (0-based)."""
    out = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _parse_value(raw)
        parts = key.split(".")
        if parts[0] in SECTIONS and len(parts) == 2:
            section = out.get(parts[0])
            if section is None:
                section = out[parts[0]] = {}
            if not isinstance(section, dict):
                raise UserError(f"override {item!r}: {parts[0]!r} is not a section (mapping) in the recipe")
            section[parts[1]] = value
        elif parts[0] == "stages" and len(parts) == 3:
            stages = out.get("stages")
            try:
                idx = int(parts[1])
                target = stages[idx]
            except (TypeError, ValueError, IndexError) as exc:
                raise UserError(f"override {item!r}: the recipe has no stage {parts[1]}") from exc
            target[parts[2]] = value
        elif len(parts) == 1:
            out[key] = value
        else:
            raise UserError(f"override {item!r}: use key=value, SECTION.key=value or stages.I.key=value")
    return out


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(v: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` (no dot) as text; recipes mean a number."""
    if isinstance(v, str) and _FLOAT_RE.match(v.strip()):
        return float(v)
    return v


def _canonical(d: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        v = _number(v)
        name = ALIASES.get(k, k)
        if name in out and name != k:
            raise UserError(f"{where}: both {k!r} and {name!r} are set")
        if k == "warmup":  # a ratio (< 1) or a number of steps
            name = "warmup_ratio" if isinstance(v, float) and v < 1 else "warmup_steps"
        out[name] = v
    return out


# ---------------------------------------------------------------------------------------------------------------
# Paths


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def resolve_path(value: str, recipe_dir: Path, must_exist: bool = True) -> str:
    """An absolute path: as given if absolute; else relative to the current directory, the recipe's directory or
    the repository root (for ``configs/...``), the first that exists."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    for base in (Path.cwd(), recipe_dir, _repo_root()):
        if (base / p).exists():
            return str((base / p).resolve())
    if must_exist:
        return ""
    return str((Path.cwd() / p).resolve())


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


# ---------------------------------------------------------------------------------------------------------------
# Resolution


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from exc


def default_nproc() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except Exception:  # pragma: no cover - torch import problems show up elsewhere
        pass
    return 1


def resolve_launch(top: dict[str, Any], uses_deepspeed: bool) -> Launch:
    """Launcher settings: recipe keys, overridden by NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
    LAUNCHER, HOSTFILE from the environment."""
    nproc = _int_env("NPROC_PER_NODE", int(top.get("nproc_per_node") or default_nproc()))
    nnodes = _int_env("NNODES", int(top.get("nnodes") or 1))
    node_rank = _int_env("NODE_RANK", int(top.get("node_rank") or 0))
    addr = os.environ.get("MASTER_ADDR") or str(top.get("master_addr") or "127.0.0.1")
    port_raw = os.environ.get("MASTER_PORT") or top.get("master_port")
    port = int(port_raw) if port_raw not in (None, "") else None
    launcher = os.environ.get("LAUNCHER") or str(top.get("launcher") or "torchrun")
    if launcher not in ("torchrun", "deepspeed"):
        raise UserError(f"launcher must be 'torchrun' or 'deepspeed', got {launcher!r}")
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"bad launch geometry: nproc_per_node={nproc}, nnodes={nnodes}, node_rank={node_rank}")
    distributed = nproc * nnodes > 1 or uses_deepspeed or os.environ.get("FORCE_TORCHRUN", "0") in ("1", "true")
    if not distributed:
        launcher = "none"
    if nnodes > 1 and port is None:
        port = 29500  # every node must agree on it
    return Launch(launcher, nproc, nnodes, node_rank, addr, port, os.environ.get("HOSTFILE") or top.get("hostfile"))


def _data_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_recipe(path: str | Path, overrides: list[str] | None = None) -> Plan:
    """Read, merge and check a recipe; returns the `Plan` (nothing is started, nothing is written)."""
    from idlm.training.pipeline import resolve_sections  # pipeline imports this module

    recipe_path = Path(path).resolve()
    raw = apply_overrides(load_recipe(path), list(overrides or []))
    where = str(path)
    stages_raw = raw.pop("stages", None)
    sections_raw = {k: raw.pop(k) for k in SECTIONS if k in raw}
    top = _canonical(raw, where)
    hostfile = top.pop("hostfile", None)
    if hostfile:
        top["hostfile"] = hostfile
    for k in FIXED:
        if k in top and top[k] != FIXED[k]:
            raise UserError(f"{where}: '{k}: {top[k]}' is set by idlm train (it is always {FIXED[k]!r})")
    if "output_dir" not in top:
        raise UserError(f"{where}: 'output_dir' is required")
    if stages_raw is None:
        stages_raw = [{}]
    if not isinstance(stages_raw, list) or not all(isinstance(s, dict) for s in stages_raw):
        raise UserError(f"{where}: 'stages' must be a list of mappings, e.g. [{{stride: 2}}, {{stride: 3}}]")
    recipe_dir = recipe_path.parent
    output_dir = resolve_path(str(top["output_dir"]), recipe_dir, must_exist=False)
    work_dir = resolve_path(str(top.pop("work_dir", None) or output_dir), recipe_dir, must_exist=False)
    log_file = top.get("log_file") or os.path.join(output_dir, "train_log.jsonl")
    sections, top = resolve_sections(sections_raw, top, recipe_dir, work_dir, where)
    adapter = sections.pop("adapter", None)
    if not stages_raw and adapter is None:  # an empty curriculum is only an adapter recipe (R-ISD on the base)
        raise UserError(f"{where}: 'stages' is empty and there is no 'adapter' section: nothing to train")

    stages: list[Stage] = []
    data_checks: list[dict[str, Any]] = []
    pretokenized = None
    prev_dir: str | None = None
    first_model: str | None = None
    uses_ds = False
    specs = [(o, False) for o in stages_raw] + ([(adapter, True)] if adapter is not None else [])
    for i, (override, is_adapter) in enumerate(specs, start=1):
        if "stages" in override:
            raise UserError(f"{where} stage {i}: stages cannot be nested")
        merged = {**top, **_canonical(override, f"{where} stage {i}")}
        if is_adapter:
            merged["finetuning"] = "gated_lora"
            for k in ("alpha", "distill_kl", "distill_soft", "distill_accept", "auto_balance", "teacher",
                      "model_name_or_path"):
                if k not in override:  # the curriculum's loss settings and base do not carry over to the adapter
                    merged.pop(k, None)
        settings, lf = _split_stage(merged, i, where)
        settings.output_dir = os.path.join(output_dir, stage_dir_name(i, settings.stride, is_adapter))
        # model: the recipe's base for stage 1 (and for an adapter stage), the previous stage's result afterwards
        if prev_dir is None or is_adapter:
            model = override.get("model_name_or_path") if is_adapter else lf.get("model_name_or_path")
            if is_adapter and not model:
                model = sections.get("base", {}).get("hf_dir")
            if not model:
                raise UserError(f"{where}: 'model_name_or_path' (or a 'base' section) is required"
                                + (" for the adapter" if is_adapter else ""))
            local = resolve_path(str(model), recipe_dir)
            if local:
                lf["model_name_or_path"] = local
            elif sections.get("base") and str(model).startswith(work_dir):
                lf["model_name_or_path"] = str(model)  # written by the pipeline's prepare phase
            elif not _looks_like_hub_id(str(model)):
                raise UserError(f"model not found: {model!r} is neither a directory nor a hub id (owner/name)")
            else:
                lf["model_name_or_path"] = str(model)
        else:
            if "model_name_or_path" in override:
                raise UserError(f"{where} stage {i}: a later stage starts from the previous stage's weights; "
                                "'model_name_or_path' may only be set for the first stage")
            lf["model_name_or_path"] = prev_dir
        if first_model is None:
            first_model = lf["model_name_or_path"]
        if settings.objective().uses_teacher:
            teacher = merged.get("teacher")
            settings.teacher = (resolve_path(str(teacher), recipe_dir) or str(teacher)) if teacher else first_model
        lf["output_dir"] = settings.output_dir
        lf.setdefault("run_name", f"{Path(output_dir).name}-{Path(settings.output_dir).name}")
        if lf.get("deepspeed"):
            ds = resolve_path(str(lf["deepspeed"]), recipe_dir)
            if not ds:
                raise UserError(f"DeepSpeed config not found: {lf['deepspeed']}")
            lf["deepspeed"] = ds
            uses_ds = uses_ds or settings.trainer == "llamafactory"
        checks, pre = _resolve_data(lf, merged, recipe_dir, output_dir, where, i, generated=sections.get("generate"))
        for c in checks:
            if c not in data_checks:
                data_checks.append(c)
        if pre is not None:
            pretokenized = pre
        if settings.finetuning == "gated_lora":
            if not is_adapter and len(stages_raw) > 1:
                raise UserError(f"{where}: gated-LoRA training runs one stage (the adapter's stride); "
                                "remove 'stages' or keep one, or use an 'adapter' section after the curriculum")
            lf["finetuning_type"] = "lora"
            lf.setdefault("lora_rank", 128)
            lf.setdefault("lora_target", "all")
            lf.setdefault("lora_dropout", 0.0)
        else:
            if lf.get("finetuning_type", "full") != "full":
                raise UserError(f"{where}: finetuning_type {lf['finetuning_type']!r} is not supported; use "
                                "'finetuning: full' (default) or 'finetuning: gated_lora'")
            lf["finetuning_type"] = "full"
        stages.append(Stage(settings, lf))
        if not is_adapter:
            prev_dir = settings.output_dir
    launch = resolve_launch(top, uses_ds)
    return Plan(str(recipe_path), output_dir, str(log_file), stages, launch, data_checks, pretokenized,
                work_dir=work_dir, sections=sections)


def _split_stage(merged: dict[str, Any], index: int, where: str) -> tuple[StageSettings, dict[str, Any]]:
    lf = {k: v for k, v in merged.items() if k not in IDLM_KEYS}
    for k, v in DEFAULTS.items():
        lf.setdefault(k, v)
    lf.update(FIXED)
    stride = merged.get("stride")
    finetuning = str(merged.get("finetuning", "full"))
    if finetuning not in ("full", "gated_lora"):
        raise UserError(f"{where}: finetuning must be 'full' or 'gated_lora', got {finetuning!r}")
    if stride is None:
        raise UserError(f"{where} stage {index}: set 'stride' (N >= 2) at the top level or in the stage")
    try:
        check_stride(stride)
        obj = ObjectiveConfig(
            alpha=float(merged.get("alpha", 0.0 if finetuning == "gated_lora" else 0.2)),
            auto_balance=bool(merged.get("auto_balance", False)),
            block_align=str(merged.get("block_align", "response")),
        )
    except UserError as exc:
        raise UserError(f"{where} stage {index}: {exc}") from exc
    if finetuning == "gated_lora" and (obj.alpha != 0 or obj.auto_balance):
        raise UserError(f"{where}: gated-LoRA training uses the noisy-half loss only (alpha 0, no auto_balance)")
    trainer = str(merged.get("trainer", "llamafactory"))
    if trainer not in TRAINERS:
        raise UserError(f"{where}: trainer must be one of {', '.join(TRAINERS)}, got {trainer!r}")
    try:
        kl, soft = float(merged.get("distill_kl", 0.0)), float(merged.get("distill_soft", 0.0))
        accept = float(merged.get("distill_accept", 0.0))
        ObjectiveConfig(alpha=obj.alpha, auto_balance=obj.auto_balance, distill_kl=kl, distill_soft=soft,
                        distill_accept=accept)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where} stage {index}: distill_kl, distill_soft and distill_accept must be numbers"
                        ) from exc
    except UserError as exc:
        raise UserError(f"{where} stage {index}: {exc}") from exc
    if finetuning == "gated_lora" and (kl or soft or accept):
        raise UserError(f"{where}: distillation is not supported for gated-LoRA training")
    for key in ("packing", "neat_packing"):
        if merged.get(key):
            raise UserError(f"{where}: '{key}' is not supported: the [x_t | x_0] objective needs one conversation "
                            "per row (packed rows would attend across conversations)")
    attn = merged.get("attn_implementation")
    if attn is not None and attn not in ("sdpa", "eager", "flex_attention"):
        raise UserError(f"{where}: attn_implementation must be sdpa, eager or flex_attention, got {attn!r}")
    compile_layers = merged.get("compile_layers", False)
    if not isinstance(compile_layers, bool):
        raise UserError(f"{where}: compile_layers must be true or false, got {compile_layers!r}")
    if compile_layers and finetuning == "gated_lora":
        raise UserError(f"{where}: compile_layers is supported for finetuning: full only (the gate of gated-LoRA "
                        "training is set per forward outside the layers)")
    mask_id = merged.get("mask_token_id")
    peak = merged.get("peak_tflops")
    settings = StageSettings(
        index=index,
        stride=int(stride),
        alpha=obj.alpha,
        auto_balance=obj.auto_balance,
        block_align=obj.block_align,
        finetuning=finetuning,
        attn_implementation=attn,
        mask_token_id=int(mask_id) if mask_id is not None else None,
        output_dir="",
        peak_tflops=float(peak) if peak is not None else None,
        compile_layers=compile_layers,
        trainer=trainer,
        distill_kl=kl,
        distill_soft=soft,
        distill_accept=accept,
        mask_token=str(merged["mask_token"]) if merged.get("mask_token") is not None else None,
    )
    return settings, lf


def _resolve_data(lf: dict[str, Any], merged: dict[str, Any], recipe_dir: Path, output_dir: str, where: str,
                  index: int, generated: dict[str, Any] | None = None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Point LlamaFactory at the stage's data; returns (files to validate, pretokenized build or None).
    With a ``generate`` section and no data key, the stage trains on the generated file (checked after it is
    written)."""
    if generated is not None and not any(merged.get(k) for k in ("dataset", "train_file", "pretokenized_file",
                                                                  "tokenized_path")):
        lf["dataset"] = DATA_INFO_NAME
        lf["dataset_dir"] = os.path.join(output_dir, "data")
        return ([{"kind": "train_file", "file": generated["output"], "dataset_dir": lf["dataset_dir"],
                  "validate": bool(merged.get("validate_data", True))}], None)
    train_file = merged.get("train_file")
    pre_file = merged.get("pretokenized_file")
    given = [k for k in ("dataset", "train_file", "pretokenized_file", "tokenized_path") if merged.get(k)]
    if len(given) != 1:
        raise UserError(f"{where} stage {index}: give exactly one of dataset (with dataset_dir), train_file, "
                        f"pretokenized_file or tokenized_path (got {given or 'none'})")
    validate = bool(merged.get("validate_data", True))
    if train_file:
        f = resolve_path(str(train_file), recipe_dir)
        if not f:
            raise UserError(f"data file not found: {train_file}")
        lf["dataset"] = DATA_INFO_NAME
        lf["dataset_dir"] = os.path.join(output_dir, "data")
        return ([{"kind": "train_file", "file": f, "dataset_dir": lf["dataset_dir"], "validate": validate}], None)
    if pre_file:
        f = resolve_path(str(pre_file), recipe_dir)
        if not f:
            raise UserError(f"data file not found: {pre_file}")
        cutoff = int(merged.get("cutoff_len", 2048))
        h = _data_hash(f, os.path.getsize(f), os.path.getmtime(f), cutoff)
        lf["tokenized_path"] = os.path.join(output_dir, "data", f"tokenized-{h}")
        return [], {"file": f, "path": lf["tokenized_path"], "cutoff_len": cutoff}
    if merged.get("tokenized_path"):
        tp = resolve_path(str(merged["tokenized_path"]), recipe_dir)
        if not tp:
            raise UserError(f"tokenized_path not found: {merged['tokenized_path']}")
        lf["tokenized_path"] = tp
        return [], None
    dataset_dir = str(merged.get("dataset_dir", "data"))
    if dataset_dir not in ("ONLINE",) and not dataset_dir.startswith("REMOTE:"):
        d = resolve_path(dataset_dir, recipe_dir)
        if not d:
            raise UserError(f"dataset_dir not found: {dataset_dir}")
        lf["dataset_dir"] = d
        names = [n.strip() for n in str(merged["dataset"]).split(",") if n.strip()]
        return [{"kind": "dataset", "dataset_dir": d, "names": names, "validate": validate}], None
    return [], None


def stage_done(stage: Stage) -> bool:
    return is_stage_done(stage.settings.output_dir)
