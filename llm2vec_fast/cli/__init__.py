"""The `llm2vec-fast` command line (also `python -m llm2vec_fast`).

Each subcommand lives in its own module that exposes `register(subparsers)`, which adds its parser and sets
`func` (args -> exit status) as the parser's default; adding a command means adding its module to COMMANDS.
Mistakes the user can fix (`UserError`) are printed as ``llm2vec-fast: error: ...`` without a traceback.
What the subcommands share (argparse types, the help formatter, `--no-progress`) is in cli/options.py.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError

PROG = "llm2vec-fast"
COMMANDS = ("llm2vec_fast.cli.encode", "llm2vec_fast.cli.train", "llm2vec_fast.cli.eval",
            "llm2vec_fast.cli.setup", "llm2vec_fast.cli.env")


def build_parser() -> argparse.ArgumentParser:
    """The `llm2vec-fast` argument parser, with the subcommands of every module in COMMANDS."""
    parser = argparse.ArgumentParser(prog=PROG, description="Decoder LLMs as text encoders (LLM2Vec), fast.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return its exit status.

    A UserError is printed as one line without a traceback (status 1); Ctrl-C gives status 130.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
