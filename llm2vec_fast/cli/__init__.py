"""The `llm2vec-fast` command line (also `python -m llm2vec_fast`).

Each subcommand lives in its own module that exposes `register(subparsers)`, which adds its parser and sets
`func` (args -> exit status) as the parser's default; adding a command means adding its module to COMMANDS.
Mistakes the user can fix (`UserError`) are printed as ``llm2vec-fast: error: ...`` without a traceback.
What the subcommands share (argparse types, the help formatter, `--no-progress`) is in cli/options.py.

The command modules import nothing heavy (torch, transformers, numpy) at import time, and each command checks
its arguments and input files before it imports them: `--help`, `--version`, a mistyped option or a missing file
answer in a fraction of a second (tests/test_cli_startup.py holds every command to that).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys

from .. import __version__
from ..errors import UserError

PROG = "llm2vec-fast"
COMMANDS = ("llm2vec_fast.cli.encode", "llm2vec_fast.cli.train", "llm2vec_fast.cli.eval",
            "llm2vec_fast.cli.setup", "llm2vec_fast.cli.env", "llm2vec_fast.cli.export")

_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are short: the problem, "did you mean ...?" for a mistyped option or
    choice, and where the full usage is, instead of a usage dump of 20 lines. Subcommand parsers are of this
    class too (add_subparsers makes its parsers of the parent's class)."""

    _seen: list[str] = []  # set by each parse_known_args call

    def parse_known_args(self, args=None, namespace=None):
        # Kept for error(): argparse reports a missing --output before an unknown --ouput, and only the
        # arguments can tell that the real mistake is the typo.
        self._seen = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(self._seen, namespace)
        if any(_is_option(argument) for argument in extras):
            # Here, where the options the user meant are known, not in the parent parser, which would only
            # say "unrecognized arguments".
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {self._explained(message)}\n"
                     f"{self.prog}: run '{self.prog} --help' for the options\n")

    def _explained(self, message: str) -> str:
        """`message`, or what makes it clear: the mistyped options with their likely meaning, or a close
        choice for an invalid one."""
        # A typo is reported as such where argparse saw it as an unknown argument, or as the reason a required
        # option is missing; any other message (a value that starts with "-") is argparse's own and precise.
        about_arguments = message.startswith(("unrecognized arguments", "the following arguments are required"))
        unknown = self._unknown_options() if about_arguments else []
        if unknown:
            return "; ".join(f"unrecognized option {option}{_did_you_mean(option, self._long_options())}"
                             for option in unknown)
        invalid = _INVALID_CHOICE.search(message)
        if invalid:
            choices = [choice.strip().strip("'\"") for choice in invalid.group(2).split(",")]
            return message + _did_you_mean(invalid.group(1), choices, quote=True)
        return message

    def _unknown_options(self) -> list[str]:
        """The options among this parser's arguments (up to a subcommand, whose parser checks the rest) that
        it does not know, neither whole nor as an abbreviation."""
        known = self._long_options() + [o for o in self._option_string_actions if not o.startswith("--")]
        commands = _subcommands(self)
        unknown = []
        for argument in self._seen:
            if argument == "--" or argument in commands:
                break
            name = argument.split("=", 1)[0]
            if not _is_option(name) or name in known:
                continue
            if self.allow_abbrev and name.startswith("--") and any(o.startswith(name) for o in known):
                continue
            unknown.append(name)
        return unknown

    def _long_options(self) -> list[str]:
        return [option for option in self._option_string_actions if option.startswith("--")]


def _is_option(argument: str) -> bool:
    return argument.startswith("-") and len(argument) > 1 and not _NEGATIVE_NUMBER.match(argument)


def _subcommands(parser: argparse.ArgumentParser) -> set:
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def _did_you_mean(word: str, candidates: list[str], quote: bool = False) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean {close[0]!r}?" if quote else f"; did you mean {close[0]}?"


def build_parser() -> argparse.ArgumentParser:
    """The `llm2vec-fast` argument parser, with the subcommands of every module in COMMANDS."""
    parser = Parser(prog=PROG, description="Decoder LLMs as text encoders (LLM2Vec), fast.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}",
                        help="print the version and exit")
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
