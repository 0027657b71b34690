"""The `llm2vec-fast` command line (also `python -m llm2vec_fast`).

Each subcommand lives in its own module that exposes `register(subparsers)`, which adds its parser and sets
`func` (args -> exit status) as the parser's default; adding a command means adding its module to COMMANDS.
Mistakes the user can fix (`UserError`) are printed as ``llm2vec-fast: error: ...`` without a traceback.
Shared by the subcommands: `positive_int` (argparse type), `DefaultsHelpFormatter` (``--help`` shows each default
once) and `silence_progress_bars` (what ``--no-progress`` does beyond our own bars).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

PROG = "llm2vec-fast"
COMMANDS = ("llm2vec_fast.cli_encode", "llm2vec_fast.cli_train", "llm2vec_fast.cli_eval",
            "llm2vec_fast.cli_setup")


def positive_int(value: str) -> int:
    """argparse type for counts and sizes: a clear message instead of a traceback or a silent zero."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` that shows every option's default once: "(default: X)" is appended to an option's help unless the
    help already says what its default is. Options that are off or unset by default (False, None, "", an empty
    list) get nothing, as their help says what happens without them."""

    def _get_help_string(self, action) -> str:
        help_text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ("", []) \
            or action.default is argparse.SUPPRESS
        if unset or not action.option_strings or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


def silence_progress_bars() -> None:
    """Turn off the progress bars this process would draw besides ours (`--no-progress`): transformers' ("Loading
    weights") and huggingface_hub's (cache and download bars). Our own bars are disabled where they are made."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    disable_progress_bars()


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
