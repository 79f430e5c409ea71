"""`idlm bench train`: training-step throughput of the [x_t | x_0] objective against plain AR SFT, same model and
same batch, in one run.

Each mode runs ``--warmup`` untimed and ``--steps`` timed optimizer steps (forward, backward, AdamW step) on one
device. The objective goes through `idlm.objective.idlm_loss` (compacted x_t rows, chunked CE); AR SFT is the stock
HF loss (``model(input_ids, attention_mask, labels).loss``, logits for every row). FLOPs and MFU follow
`idlm.training.flops` (6 x body params x tokens + LM head rows + attention pairs); the objective processes K + L
tokens per row (K = x_t rows kept, ``idlm.objective.noisy_rows``).

The model is a directory (its weights, or with ``--random-init`` only its config) or a built-in Qwen3 shape
(``--shape qwen3-0.6b``), so a GPU machine without network access can run it with random weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from idlm.checkpoint import load_config
from idlm.config import IDLMConfig, ObjectiveConfig, read_idlm_config
from idlm.errors import UserError
from idlm.objective import idlm_loss
from idlm.training.compile import compile_layers
from idlm.training.flops import ModelShape, ar_work, device_peak_tflops, mfu, objective_work

# Qwen3 dense shapes (public config.json values), for random-weight benchmarks without a download.
QWEN3_SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
QWEN3_COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0)
QWEN3_MASK_ID = 151669

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModeResult:
    mode: str
    step_s: float
    tokens_per_s: float  # real data tokens (L per row) per second
    model_tokens_per_s: float  # tokens through the decoder per second (K + L for the objective)
    tflops: float  # achieved model TFLOP/s
    mfu: float | None
    peak_memory_gb: float | None
    loss: float


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (an I-DLM checkpoint, or any causal LM with --mask-token-id)")
    src.add_argument("--shape", choices=sorted(QWEN3_SHAPES), help="a built-in Qwen3 shape with random weights")
    p.add_argument("--random-init", action="store_true", help="with --model: random weights from its config only")
    p.add_argument("--stride", type=int, default=None, help="N of the objective (default: the checkpoint's, else 4)")
    p.add_argument("--mask-token-id", type=int, default=None, help="MASK id (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=1, help="rows per step (default 1)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per row, L (default 4096)")
    p.add_argument("--prompt-frac", type=float, default=0.25,
                   help="fraction of each row that is prompt (unsupervised); the rest is the response (default 0.25)")
    p.add_argument("--block-align", default="response", choices=["response", "sequence"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--attn", default=None, choices=["sdpa", "eager", "flex_attention"],
                   help="attention kernel (default: flex_attention on GPU, sdpa on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (as the 8B recipe)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (idlm.training.compile; first steps pay the compile)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--modes", default="objective,ar", help="comma list of objective, ar (default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _build_model(args, device, dtype):
    attn = args.attn or ("flex_attention" if device.type == "cuda" else "sdpa")
    if args.shape:
        cfg = Qwen3Config(**QWEN3_COMMON, **QWEN3_SHAPES[args.shape])
        idlm_block = None
        mask_id = args.mask_token_id if args.mask_token_id is not None else QWEN3_MASK_ID
    else:
        cfg = load_config(args.model)
        idlm_block = read_idlm_config(cfg)
        mask_id = args.mask_token_id if args.mask_token_id is not None else (
            idlm_block.mask_token_id if idlm_block else None)
        if mask_id is None:
            raise UserError(f"{args.model} is not an I-DLM checkpoint: pass --mask-token-id")
    stride = args.stride or (idlm_block.stride if idlm_block else 4)
    torch.manual_seed(args.seed)
    if args.shape or args.random_init:
        cfg._attn_implementation = attn
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=attn).to(device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if args.compile:
        compile_layers(model)
    return model, int(mask_id), int(stride), attn


def _batch(args, vocab: int, mask_id: int, device):
    g = torch.Generator().manual_seed(args.seed)
    B, L = args.batch_size, args.seq_len
    hi = min(vocab, mask_id) if mask_id > 8 else vocab
    ids = torch.randint(4, hi, (B, L), generator=g)
    labels = ids.clone()
    labels[:, : int(L * args.prompt_frac)] = -100
    mask = torch.ones(B, L, dtype=torch.long)
    return ids.to(device), labels.to(device), mask.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if not 0 <= args.prompt_frac < 1:
        raise UserError(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 2:
        raise UserError("--steps, --batch-size must be >= 1, --seq-len >= 2, --warmup >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"objective", "ar"}:
        raise UserError(f"--modes takes objective and/or ar, got {args.modes!r}")
    model, mask_id, stride, attn = _build_model(args, device, dtype)
    cfg = IDLMConfig(mask_token_id=mask_id, stride=stride,
                     objective=ObjectiveConfig(alpha=0.2, block_align=args.block_align))
    shape = ModelShape.of(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, labels, mask = _batch(args, vocab, mask_id, device)
    peak = args.peak_tflops or device_peak_tflops(device, dtype)
    # fused: one kernel for the whole update on CUDA (what `optim: adamw_torch_fused` gives a recipe)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            fused=device.type == "cuda")
    works = {"objective": objective_work(ids, labels, mask, cfg), "ar": ar_work(ids, mask)}

    def step(mode: str) -> float:
        if mode == "objective":
            loss = idlm_loss(model, ids, labels, cfg, mask).loss
        else:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    results = []
    for mode in modes:
        for _ in range(args.warmup):
            step(mode)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(mode)
        _sync(device)
        dt = (time.perf_counter() - t0) / args.steps
        w = works[mode]
        flops = w.flops(shape)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results.append(ModeResult(mode, dt, w.tokens / dt, w.model_tokens / dt, flops / dt / 1e12,
                                  mfu(flops, dt, 1, peak), mem, loss if math.isfinite(loss) else float("nan")))
    by = {r.mode: r for r in results}
    report = {
        "model": args.model or args.shape,
        "params": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "attn": attn,
        "stride": stride,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "prompt_frac": args.prompt_frac,
        "grad_ckpt": bool(args.grad_ckpt),
        "compile": bool(args.compile),
        "peak_tflops": peak,
        "work": {m: asdict(works[m]) for m in modes},
        "results": [asdict(r) for r in results],
        "flop_formula": "6*P_body*T + 6*d*V*R + 12*n_layers*d_attn*A (see idlm.training.flops)",
    }
    if "objective" in by and "ar" in by:
        report["objective_step_over_ar_step"] = by["objective"].step_s / by["ar"].step_s
    return report


def format_report(rep: dict) -> str:
    lines = [f"model {rep['model']} ({rep['params'] / 1e6:.1f}M params) on {rep['device']}, {rep['dtype']}, "
             f"{rep['attn']}, batch {rep['batch_size']} x {rep['seq_len']} tokens, stride {rep['stride']}"]
    lines.append(f"{'mode':<10} {'step s':>9} {'tok/s':>10} {'model tok/s':>12} {'TFLOP/s':>9} {'MFU':>7} "
                 f"{'peak GB':>8} {'loss':>8}")
    for r in rep["results"]:
        mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        lines.append(f"{r['mode']:<10} {r['step_s']:>9.4f} {r['tokens_per_s']:>10.0f} {r['model_tokens_per_s']:>12.0f} "
                     f"{r['tflops']:>9.2f} {mfu_s:>7} {mem:>8} {r['loss']:>8.3f}")
    if "objective_step_over_ar_step" in rep:
        lines.append(f"objective step / AR step: {rep['objective_step_over_ar_step']:.2f}x")
    return "\n".join(lines)


def run_bench_cli(args) -> int:
    rep = run_bench(args)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m idlm.training.bench", description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_bench_cli(args)
    except UserError as exc:
        print(f"idlm bench train: error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
