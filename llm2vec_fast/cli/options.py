"""What the subcommands share: `positive_int` (argparse type), `DefaultsHelpFormatter` (``--help`` shows each
default once) and `silence_progress_bars` (what ``--no-progress`` does beyond our own bars)."""

from __future__ import annotations

import argparse


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
