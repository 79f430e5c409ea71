"""Settings of ISD under SGLang, the paper-style YAML, server-argument checks and the launch command line.

Nothing here imports SGLang: the functions take SGLang's ``ServerArgs`` duck-typed (any object with the same
attributes), so they are tested on CPU with a namespace.

How the stride reaches the worker: SGLang sizes KV reservation and CUDA graphs by
``--speculative-num-draft-tokens``, which for ISD is the step width 2N - 1. The worker derives N from it. The draft
mode and the seed travel in the environment variable ``IDLM_ISD_CONFIG`` (JSON), which SGLang's scheduler processes
inherit from the launcher.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idlm.config import IDLMConfig, check_stride, read_idlm_config, step_rows
from idlm.errors import UserError
from idlm.requests import DEFAULT_DRAFT_MODE, SERVING_DRAFT_MODES

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.15"  # the version whose internals this package was written against (pyproject pins it)
ALGORITHM_NAME = "ISD"  # --speculative-algorithm ISD
PAPER_ALGORITHM_NAME = "IDLMBlockN"  # --dllm-algorithm IDLMBlockN (the paper's spelling, translated)
ENV_CONFIG = "IDLM_ISD_CONFIG"
SUPPORTED_ATTENTION_BACKENDS = ("triton", "flashinfer", "fa3")
# Server flags of every launch (ISD and its AR baseline): seen working with the offline SGLang bundle; a later flag in
# ``extra`` overrides them (argparse keeps the last value)
LAUNCH_FLAGS = ("--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none")

# Paper YAML keys that only tuned its server-wide sampling or logging: sampling now comes from each request.
_PAPER_IGNORED_KEYS = ("temperature", "top_k", "top_p", "confidence_threshold", "stats_file", "rounds_file",
                       "draft_conf_file", "causal_prefill", "verify_num_specs")
# Paper YAML keys that would make the output differ from the AR distribution: refused unless at their exact value.
_PAPER_EXACT_VALUES = {"use_spec_verify": True, "verify_alpha": 1.0, "fast_verify": False, "output_correction": False,
                       "confidence_accept_threshold": 0.0, "conditional_lora": False}


@dataclass
class ISDServeConfig:
    """ISD settings of one server.

    stride: N, tokens per step (>= 2); each decode forward reads 2N - 1 rows per request.
    draft_mode: how sampled requests propose drafts from the MASK rows: "argmax" (exact rule: accept with p(x*),
        else sample from p without x*; needs no stored q) or "sample" (x ~ q, min(1, p/q) with residual; keeps each
        request's q of shape [N - 1, V] on the GPU). Greedy requests always verify by argmax (exact greedy AR).
    seed: seeds the worker's GPU generator for acceptance and sampling uniforms.
    lora: R-ISD: a gated-LoRA adapter directory (`idlm.lora`) applied to the MASK rows of the served base
        model only (`gated_lora.py`); its ``idlm_adapter.json`` gives the MASK id. None: the model is an I-DLM.
    fused_verify: sampled steps with argmax drafts and top-k on every request (the paper's protocol) verify in one
        Triton kernel (`verify_sampling.py`) instead of some thirty PyTorch launches; same rule, same output for
        the same uniforms (on an H200 the sampled commit drops from 2.4 to 1.5-1.6 ms at 32 and 64 requests).
    """

    stride: int
    draft_mode: str = DEFAULT_DRAFT_MODE["sglang"]
    seed: int = 0
    lora: str | None = None
    fused_verify: bool = True

    def __post_init__(self) -> None:
        check_stride(self.stride)
        if self.draft_mode not in SERVING_DRAFT_MODES:
            raise UserError(f"ISD draft_mode must be one of {', '.join(SERVING_DRAFT_MODES)}, got {self.draft_mode!r}")

    @property
    def num_draft_tokens(self) -> int:
        """SGLang's ``--speculative-num-draft-tokens`` for ISD: the rows of one step (`idlm.config.step_rows`)."""
        return step_rows(self.stride)

    @staticmethod
    def stride_from_num_draft_tokens(rows: int) -> int:
        """N from ``--speculative-num-draft-tokens`` (the inverse of `idlm.config.step_rows`)."""
        if rows % 2 == 0:
            raise UserError(f"ISD needs --speculative-num-draft-tokens = 2N - 1 (odd), got {rows}")
        stride = (rows + 1) // 2
        try:
            check_stride(stride)
        except UserError as exc:
            raise UserError(f"--speculative-num-draft-tokens {rows} means ISD stride {stride}: {exc}") from None
        return stride

    def to_env(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_env(cls, stride: int | None = None) -> ISDServeConfig | None:
        """The config the launcher put in ``IDLM_ISD_CONFIG`` (None when unset); ``stride`` overrides its stride."""
        raw = os.environ.get(ENV_CONFIG)
        if not raw:
            return cls(stride) if stride is not None else None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UserError(f"{ENV_CONFIG} is not valid JSON: {exc}") from None
        if stride is not None:
            data["stride"] = stride
        return cls(**data)


def load_isd_yaml(path: str | Path) -> ISDServeConfig:
    """Read an ISD algorithm YAML (configs/inference/idlm_blockN*.yaml).

    Keys: ``stride`` (or the paper's ``gen_block_size``), ``block_size`` (the paper's SGLang block; must be 2N - 1
    when given), ``draft_mode``, ``seed``. The paper's sampling and logging keys are accepted and ignored (sampling
    comes from each request); its inexact switches are refused unless they hold their exact value.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"ISD config {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {p}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p} must hold a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    stride = data.pop("stride", None)
    gen = data.pop("gen_block_size", None)
    if stride is not None and gen is not None and stride != gen:
        raise UserError(f"{p}: stride ({stride}) and gen_block_size ({gen}) disagree")
    stride = stride if stride is not None else gen
    if stride is None:
        raise UserError(f"{p}: set 'stride' (or the paper's 'gen_block_size')")
    block = data.pop("block_size", None)
    kwargs: dict[str, Any] = {}
    for key in ("draft_mode", "seed"):
        if key in data:
            kwargs[key] = data.pop(key)
    for key, exact in _PAPER_EXACT_VALUES.items():
        if key in data:
            value = data.pop(key)
            if value != exact:
                raise UserError(f"{p}: {key}={value!r} makes the output differ from the AR distribution; "
                                f"only {key}={exact!r} is supported")
    ignored = [k for k in _PAPER_IGNORED_KEYS if data.pop(k, None) is not None]
    if ignored:
        log.warning("%s: ignoring %s (sampling settings come from each request)", p, ", ".join(ignored))
    if data:
        raise UserError(f"{p}: unknown keys {', '.join(sorted(data))}")
    try:
        cfg = ISDServeConfig(stride=stride, **kwargs)
    except UserError as exc:
        raise UserError(f"{p}: {exc}") from None
    if block is not None and block != cfg.num_draft_tokens:
        raise UserError(f"{p}: block_size must be 2N - 1 = {cfg.num_draft_tokens} for stride {cfg.stride}, got {block}")
    return cfg


def local_idlm_config(model_path: str | None) -> IDLMConfig | None:
    """The ``idlm`` block (`idlm.config.read_idlm_config`) of a local checkpoint's config.json; None for a hub id,
    a directory without config.json or a plain AR model. Reads the JSON only: no hub access, no transformers."""
    if not model_path:
        return None
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return read_idlm_config(data) if isinstance(data, dict) else None


def mask_token_id_of(hf_config: Any, model_path: str | None = None) -> int:
    """The MASK input id of an I-DLM checkpoint served by SGLang (its config's ``idlm`` block)."""
    cfg = read_idlm_config(hf_config) or local_idlm_config(model_path)
    if cfg is None:
        raise UserError(f"{model_path or 'the model'} is not an I-DLM checkpoint (config.json has no 'idlm' block); "
                        "convert it with `idlm convert`")
    return cfg.mask_token_id


def translate_dllm_args(args: Any) -> bool:
    """Rewrite the paper's ``--dllm-algorithm IDLMBlockN --dllm-algorithm-config Y`` into ``--speculative-algorithm
    ISD`` in place (before SGLang resolves its arguments). Returns True when it did."""
    algo = getattr(args, "dllm_algorithm", None)
    if algo is None or not str(algo).startswith("IDLMBlockN"):
        return False
    if algo != PAPER_ALGORITHM_NAME:
        raise UserError(f"--dllm-algorithm {algo} is not supported; use {PAPER_ALGORITHM_NAME} (exact ISD)")
    path = getattr(args, "dllm_algorithm_config", None)
    if not path:
        raise UserError(f"--dllm-algorithm {PAPER_ALGORITHM_NAME} needs --dllm-algorithm-config "
                        "(e.g. configs/inference/idlm_blockN4.yaml)")
    if getattr(args, "speculative_algorithm", None) not in (None, ALGORITHM_NAME):
        raise UserError(f"--dllm-algorithm {PAPER_ALGORITHM_NAME} cannot be combined with "
                        f"--speculative-algorithm {args.speculative_algorithm}")
    cfg = load_isd_yaml(path)
    os.environ[ENV_CONFIG] = cfg.to_env()
    args.speculative_algorithm = ALGORITHM_NAME
    args.speculative_num_draft_tokens = cfg.num_draft_tokens
    args.dllm_algorithm = None
    args.dllm_algorithm_config = None
    log.info("translated --dllm-algorithm %s (%s) into --speculative-algorithm %s, stride %d",
             PAPER_ALGORITHM_NAME, path, ALGORITHM_NAME, cfg.stride)
    return True


def validate_server_args(args: Any) -> None:
    """SGLang's ``validate_server_args`` hook for ISD: fix the spec settings ISD needs and refuse what it cannot do.

    Mutates ``args``: speculative_num_draft_tokens = 2N - 1 (N from the env config, else the checkpoint's ``idlm``
    block), speculative_num_steps = speculative_eagle_topk = 1, mixed chunks off (overlap scheduling is left as set).
    """
    rows = getattr(args, "speculative_num_draft_tokens", None)
    env_cfg = ISDServeConfig.from_env()
    if rows is None:
        cfg = env_cfg
        if cfg is None:
            ckpt = local_idlm_config(getattr(args, "model_path", None))
            if ckpt is None:
                raise UserError("ISD: set --speculative-num-draft-tokens 2N-1 (e.g. 7 for N = 4), or serve a local "
                                "I-DLM checkpoint (the idlm block of its config.json gives the stride)")
            cfg = ISDServeConfig(ckpt.stride)
        args.speculative_num_draft_tokens = cfg.num_draft_tokens
    else:
        ISDServeConfig.stride_from_num_draft_tokens(int(rows))
    if getattr(args, "speculative_draft_model_path", None):
        raise UserError("ISD drafts with the served model itself; drop --speculative-draft-model-path")
    if getattr(args, "enable_lora", False) or getattr(args, "lora_paths", None):
        raise UserError("SGLang's own LoRA (--enable-lora / --lora-paths) puts an adapter on every row of a request; "
                        "for R-ISD give the gated adapter to ISD instead: `idlm serve --engine sglang --lora DIR`")
    if env_cfg is not None and env_cfg.lora:
        if getattr(args, "tp_size", 1) != 1:
            raise UserError("R-ISD under SGLang (gated LoRA) supports tensor parallel size 1 only")
        if getattr(args, "enable_torch_compile", False):
            raise UserError("R-ISD under SGLang (gated LoRA) does not support --enable-torch-compile")
        # the gate is computed in a Python wrapper of the model's forward: keep prefill out of compiled graphs.
        # SGLang resolves --disable-prefill-cuda-graph into cuda_graph_config before this hook runs, so set both.
        args.disable_prefill_cuda_graph = True
        prefill = getattr(getattr(args, "cuda_graph_config", None), "prefill", None)
        if prefill is not None and getattr(prefill, "backend", "disabled") != "disabled":
            log.info("R-ISD: prefill CUDA graphs off (was %s)", prefill.backend)
            prefill.backend = "disabled"
    if getattr(args, "pp_size", 1) != 1:
        raise UserError("ISD under SGLang supports pipeline parallel size 1 only")
    if getattr(args, "enable_dp_attention", False):
        raise UserError("ISD under SGLang does not support --enable-dp-attention")
    if getattr(args, "disaggregation_mode", "null") not in (None, "null"):
        raise UserError("ISD under SGLang does not support prefill/decode disaggregation")
    backend = getattr(args, "attention_backend", None)
    if backend is not None and backend not in SUPPORTED_ATTENTION_BACKENDS:
        names = ", ".join(SUPPORTED_ATTENTION_BACKENDS)
        raise UserError(f"ISD needs an attention backend with causal TARGET_VERIFY ({names}), got {backend}")
    if getattr(args, "speculative_adaptive", False):
        raise UserError("ISD has a fixed step width; drop --speculative-adaptive")
    args.speculative_num_steps = 1
    args.speculative_eagle_topk = 1
    # overlap scheduling stays as the user set it (on by default): the worker needs nothing from the CPU between
    # steps. Mixed chunks (prefill rows inside a decode batch) would break the uniform 2N - 1 rows per request.
    args.enable_mixed_chunk = False


def build_launch_command(
    model: str,
    stride: int | None,
    host: str = "127.0.0.1",
    port: int = 30000,
    python: str = "python3",
    draft_mode: str = DEFAULT_DRAFT_MODE["sglang"],
    extra: list[str] | None = None,
    lora: str | None = None,
    fused_verify: bool = True,
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) that start SGLang with ISD on ``model`` (R-ISD on a base model with ``lora``, a
    gated-LoRA adapter directory).

    stride None takes the checkpoint's (the adapter's with ``lora``). The flags that were seen working on an H100
    with the offline SGLang bundle (triton attention, pytorch sampling, no grammar backend) are the defaults;
    ``extra`` is appended verbatim, so a later flag overrides them.
    """
    if lora is not None:
        from idlm.lora import GatedLoRAConfig  # torch and transformers: only for R-ISD launches

        meta = GatedLoRAConfig.load(lora)
        cfg = ISDServeConfig(stride=stride or meta.stride, draft_mode=draft_mode, lora=str(Path(lora).resolve()),
                             fused_verify=fused_verify)
    else:
        ckpt = local_idlm_config(model)
        if ckpt is None and Path(model).is_dir():
            raise UserError(f"{model} is not an I-DLM checkpoint (no 'idlm' block in config.json): convert it with "
                            "`idlm convert`")
        if stride is None:
            if ckpt is None:
                raise UserError(f"{model} is not a local I-DLM checkpoint, so its stride is unknown: pass --stride N")
            stride = ckpt.stride
        cfg = ISDServeConfig(stride=stride, draft_mode=draft_mode, fused_verify=fused_verify)
    argv = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port),
            "--speculative-algorithm", ALGORITHM_NAME, "--speculative-num-draft-tokens", str(cfg.num_draft_tokens),
            *LAUNCH_FLAGS]
    return argv + list(extra or []), {ENV_CONFIG: cfg.to_env(), **grpc_port_env(port)}


# SGLang 0.5.15 derives a gRPC port from --port (+ 10000) and refuses to start when that passes 65535, even with
# gRPC off; a free port from the OS is often above 55535.
GRPC_PORT_OFFSET = 10000
ENV_GRPC_PORT = "SGLANG_GRPC_PORT"


def grpc_port_env(port: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Extra environment that lets SGLang start on ``port``: ``{SGLANG_GRPC_PORT: port - 10000}`` where
    ``port + 10000`` would be out of range and the caller's environment does not set it, else nothing."""
    environ = os.environ if environ is None else environ
    if port + GRPC_PORT_OFFSET <= 65535 or ENV_GRPC_PORT in environ:
        return {}
    return {ENV_GRPC_PORT: str(port - GRPC_PORT_OFFSET)}


def build_ar_launch_command(model: str, host: str = "127.0.0.1", port: int = 30000, python: str = "python3",
                            extra: list[str] | None = None) -> list[str]:
    """argv that starts plain SGLang autoregressive decoding of ``model`` (any causal LM SGLang loads) with the same
    flags as `build_launch_command`: the AR baseline that ISD is measured against, one token per forward."""
    return [python, "-m", "sglang.launch_server", "--model-path", model, "--host", host, "--port", str(port),
            *LAUNCH_FLAGS, *(extra or [])]
