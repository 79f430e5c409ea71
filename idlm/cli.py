"""The `idlm` command line. Each subcommand lives in a small handler; heavy imports happen inside them
so that `idlm --help` is instant. Bad input raises `UserError`: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from idlm.errors import UserError

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
