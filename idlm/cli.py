"""The `idlm` command line. Each subcommand lives in a small handler; heavy imports happen inside them
so that `idlm --help` is instant. Bad input raises `UserError`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from idlm.errors import UserError
from idlm.requests import DEFAULT_DRAFT_MODE, SERVING_DRAFT_MODES

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (the usage text stays behind --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _cmd_convert(args: argparse.Namespace) -> int:
    from idlm.config import ObjectiveConfig
    from idlm.convert import convert

    report = convert(
        base=args.base,
        output=args.output,
        stride=args.stride,
        mask_token_id=args.mask_token_id,
        objective=ObjectiveConfig(alpha=args.alpha, auto_balance=args.auto_balance, block_align=args.block_align),
        gguf_file=args.gguf_file,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(report.to_json() if args.json else
          f"wrote I-DLM checkpoint {report.output} (mask token id {report.mask_token_id}, "
          f"{report.num_embedding_rows} embedding rows{', resized' if report.resized_embeddings else ''})")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="turn a pretrained causal LM into an I-DLM checkpoint",
                       description="Turn a pretrained causal LM (Qwen3, Llama family, ...) into an I-DLM checkpoint: "
                                   "same weights and architecture, a MASK token, an `idlm` block in config.json.")
    p.add_argument("--base", required=True, help="base model directory or hub id")
    p.add_argument("--output", required=True, help="directory to write (must not exist, unless --overwrite)")
    p.add_argument("--stride", type=int, default=2, help="N, tokens per ISD step (>= 2; default 2)")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="embedding row to use as MASK (default: the first row the tokenizer never uses, "
                        "e.g. 151669 for Qwen3; else a new <|mask|> token)")
    p.add_argument("--gguf-file", default=None, help="load the base from this GGUF file inside --base")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--alpha", type=float, default=0.2, help="weight of the clean AR loss (default 0.2)")
    p.add_argument("--auto-balance", action="store_true", help="balance the clean loss to the noisy loss")
    p.add_argument("--block-align", default="response", choices=["response", "sequence"],
                   help="where mask blocks start in training (default: at each response)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=_cmd_convert)


# Subcommands register here; later parts (generate, serve, train, eval, bench, tables) add theirs.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_convert]


def _cmd_serve_sglang(args: argparse.Namespace) -> int:
    import os
    import shlex
    import subprocess

    from idlm.inference.sglang_isd.config import build_ar_launch_command, build_launch_command, grpc_port_env

    if args.ar and (args.stride is not None or args.lora or args.fused_verify is not None):
        raise UserError("--ar serves plain autoregressive decoding: it takes neither --stride, --lora nor "
                        "--fused-verify")
    if args.stride is not None:
        from idlm.config import check_stride

        check_stride(args.stride)  # ISD under SGLang: N >= 2
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    extra = ["--max-running-requests", str(args.max_batch_size)]
    if args.served_model_name:
        extra += ["--served-model-name", args.served_model_name]
    if args.dtype != "auto":
        extra += ["--dtype", args.dtype]
    extra += shlex.split(args.sglang_args or "")
    if args.ar:
        argv, env = build_ar_launch_command(args.model, host=args.host, port=args.port, python=sys.executable,
                                            extra=extra), grpc_port_env(args.port)
    else:
        argv, env = build_launch_command(args.model, args.stride, host=args.host, port=args.port,
                                         python=sys.executable, extra=extra, lora=args.lora,
                                         draft_mode=args.draft_mode or DEFAULT_DRAFT_MODE["sglang"],
                                         fused_verify=args.fused_verify is not False)
    if args.print_command:
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv))
        return 0
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        raise UserError("sglang is not installed in this environment (pip install 'idlm[serve]')")
    return subprocess.call(argv, env={**os.environ, **env})


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.engine == "sglang" and args.adaptive_stride:
        raise UserError("--adaptive-stride is an option of the native engine for now: the SGLang worker runs one "
                        "stride (its CUDA graphs are captured for 2N - 1 rows per request)")
    if args.engine == "sglang":
        return _cmd_serve_sglang(args)
    if args.ar:
        raise UserError("--ar is an option of --engine sglang (the native engine serves AR with --stride 1)")
    if args.fused_verify is not None:
        raise UserError("--fused-verify is an option of --engine sglang (a Triton kernel of the SGLang worker)")
    from idlm.inference.server import serve

    serve(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        stride=args.stride,
        lora=args.lora,
        device=args.device,
        max_batch_size=args.max_batch_size,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        log_level="info" if args.verbose else "warning",
        max_request_bytes=args.max_request_bytes,
        draft_mode=args.draft_mode or DEFAULT_DRAFT_MODE["native"],
        adaptive_stride=args.adaptive_stride,
    )
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an I-DLM checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve an I-DLM checkpoint with introspective strided decoding (ISD) behind "
                                   "OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/health. Concurrent requests are batched.")
    p.add_argument("--model", required=True, help="I-DLM checkpoint directory (from `idlm convert` or `idlm train`)")
    p.add_argument("--engine", default="native", choices=["native", "sglang"],
                   help="native: the reference PyTorch ISD engine (default); sglang: SGLang with the ISD worker "
                        "(needs the serve extra and a CUDA GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--stride", type=int, default=None, help="N, tokens per ISD step (default: the checkpoint's)")
    p.add_argument("--lora", default=None, help="LoRA adapter directory to apply to the model")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: the directory name)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="native engine: request bodies larger than this get HTTP 413 (default 8 MiB)")
    p.add_argument("--draft-mode", default=None, choices=SERVING_DRAFT_MODES,
                   help="how sampled requests draft (both exact, see docs/isd.md; default: sample on the native "
                        "engine, argmax on sglang, idlm.requests.DEFAULT_DRAFT_MODE says why)")
    p.add_argument("--adaptive-stride", action="store_true",
                   help="native engine: measure the decode step's cost at start-up and choose N (at most --stride) "
                        "for every step from it and the live acceptance, for the most tokens/s (docs/isd.md)")
    p.add_argument("--sglang-args", default="", help="sglang engine: extra flags for sglang.launch_server (one string)")
    p.add_argument("--print-command", action="store_true", help="sglang engine: print the launch command and exit")
    p.add_argument("--fused-verify", action=argparse.BooleanOptionalAction, default=None,
                   help="sglang engine: verify sampled steps (argmax drafts, top-k on every request) in one Triton "
                        "kernel instead of PyTorch ops, same rule and output (default on; docs/serving.md)")
    p.add_argument("--ar", action="store_true", help="sglang engine: plain autoregressive decoding of any causal LM "
                   "(no ISD worker), same flags: the baseline ISD is measured against")
    p.set_defaults(func=_cmd_serve)


SUBCOMMANDS.append(_add_serve)


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from idlm.config import decode_stride_problem

    if args.stride is not None and decode_stride_problem(args.stride):
        raise UserError(f"--{decode_stride_problem(args.stride)}")
    from idlm.requests import InvalidRequest, check_sampling

    try:  # the rules the server and the engine apply too
        check_sampling(args.temperature, args.top_p, args.top_k, args.seed, args.max_new_tokens,
                       spell=lambda field: "--" + field.replace("_", "-"))
    except InvalidRequest as exc:
        raise UserError(str(exc)) from None
    if args.device is not None:
        import torch

        try:
            dev = torch.device(args.device)
        except RuntimeError as exc:
            raise UserError(f"bad --device {args.device!r}: {exc}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: CUDA is not available on this machine")
    from idlm.chat import encode_prompt, stop_token_ids
    from idlm.inference.engine import ISDEngine, SamplingParams

    engine = ISDEngine.from_pretrained(args.model, stride=args.stride, lora=args.lora, device=args.device,
                                       dtype=args.dtype, max_batch_size=1)
    tokenizer = engine.tokenizer
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat_template=not args.no_chat_template)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop_token_ids=stop_token_ids(tokenizer, engine.model),
                            seed=args.seed, draft_mode=args.draft_mode)
    try:
        out = engine.generate([prompt_ids], params)[0]
    except ValueError as exc:  # the engine's checks of the request (empty prompt, too long, ...)
        raise UserError(str(exc)) from exc
    text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "tokens": out.token_ids, "tpf": out.tpf, "acceptance": out.acceptance,
                          "forwards": out.forwards, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.prompt_tokens, "stride": engine.stride}))
    else:
        print(text)
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt with ISD",
                       description="Generate text for one prompt with introspective strided decoding (ISD) in the "
                                   "reference engine: an I-DLM checkpoint, or a base AR model with a gated-LoRA "
                                   "adapter (R-ISD, --lora), or any causal LM with --stride 1 (plain AR).")
    p.add_argument("--model", required=True, help="I-DLM checkpoint (or, with --lora, base model) directory")
    p.add_argument("--prompt", required=True, help="the user prompt")
    p.add_argument("--stride", type=int, default=None,
                   help="N, tokens per step (default: the checkpoint's or adapter's; 1 = plain AR decoding)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--lora", default=None, help="gated-LoRA adapter directory (R-ISD on a base model)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--draft-mode", default=DEFAULT_DRAFT_MODE["native"], choices=["sample", "argmax", "paper_argmax"],
                   help="how drafts are proposed: sample (exact, default), argmax (exact, deterministic drafts), "
                        "paper_argmax (the paper's biased rule, for comparison only)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as plain text")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, tokens, tpf, acceptance (per draft position), forwards")
    p.set_defaults(func=_cmd_generate)


SUBCOMMANDS.append(_add_generate)


def _cmd_train(args: argparse.Namespace) -> int:
    from idlm.training.launch import run_recipe

    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip()) if args.phases else None
    return run_recipe(args.recipe, args.overrides, dry_run=args.dry_run, **({"phases": phases} if phases else {}))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an I-DLM from a recipe (LlamaFactory + DeepSpeed, stride curriculum)",
                       description="Run a training recipe (a LlamaFactory-style YAML file plus I-DLM keys: stride, "
                                   "alpha, auto_balance, distill_kl, distill_soft, distill_accept, stages, "
                                   "finetuning: gated_lora, ...) and optional pipeline sections: base (convert an AR "
                                   "model), generate (its "
                                   "sampled responses as data), adapter (a gated-LoRA stage), evaluate (quality and "
                                   "ISD hooks). Stages run in order, each from the previous stage's weights; "
                                   "rerunning the same command after a kill skips finished phases and stages and "
                                   "resumes the current one from its last checkpoint. "
                                   "Ranks: NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, LAUNCHER "
                                   "(torchrun or deepspeed). See docs/training.md.")
    p.add_argument("recipe", help="recipe YAML file (e.g. configs/train/qwen3_8b_idlm.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override recipe keys (values read as YAML); stages.I.key=value sets a key of stage I, "
                        "SECTION.key=value a key of a section (e.g. generate.samples_per_prompt=4)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan as JSON and exit")
    p.add_argument("--phases", default=None, metavar="LIST",
                   help="comma-separated phases to run: prepare,generate,train,evaluate (default: all)")
    p.set_defaults(func=_cmd_train)


SUBCOMMANDS.append(_add_train)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from idlm.training.bench import run_bench_cli

    return run_bench_cli(args)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    # `idlm bench` groups benchmarks; other parts add their own sub-subcommands to BENCH_SUBCOMMANDS.
    p = sub.add_parser("bench", help="benchmarks (train: training-step throughput of the objective vs AR SFT)")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", parser_class=_Parser)
    for add in BENCH_SUBCOMMANDS:
        add(bench_sub)
    p.set_defaults(func=lambda a: (p.print_help(), EXIT_USAGE)[1])


def _add_bench_train(sub: argparse._SubParsersAction) -> None:
    from idlm.training.bench import add_bench_arguments

    p = sub.add_parser("train", help="time one training step of the objective against one AR SFT step",
                       description="Time training steps of the [x_t | x_0] objective and of plain AR SFT (stock HF "
                                   "loss) on the same model and batch, in one run; report tokens/s and MFU.")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench_train)


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    from idlm.eval.throughput import run_cli

    return run_cli(args)


def _add_bench_throughput(sub: argparse._SubParsersAction) -> None:
    from idlm.eval.throughput import add_arguments

    p = sub.add_parser("throughput", help="serving throughput of a local server per concurrency level",
                       description="Stream requests to a server on this machine (`idlm serve`, SGLang with or without "
                                   "ISD) at each concurrency level; report total and per-request tokens/s, TTFT, the "
                                   "server's TPF and the decode step time; write JSON (read by `idlm tables`) and a "
                                   "plot. Formulas: eval/throughput.py.")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench_throughput)


BENCH_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_bench_train, _add_bench_throughput]
SUBCOMMANDS.append(_add_bench)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    # `idlm eval`, `idlm data fetch|list`, `idlm tables`: the evaluation harness (eval/cli.py)
    from idlm.eval.cli import add_data, add_eval, add_tables

    for add in (add_eval, add_data, add_tables):
        add(sub)


SUBCOMMANDS.append(_add_eval_commands)


def build_parser() -> argparse.ArgumentParser:
    from idlm import __version__

    parser = _Parser(prog="idlm", description="Introspective Diffusion Language Models: convert, train, serve, eval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")

    parser.add_argument("--version", action="version", version=f"idlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"idlm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"idlm {args.command}: interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
