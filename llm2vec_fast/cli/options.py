"""What the subcommands share: `add_model_options` (the options that choose and configure the model),
`positive_int` (argparse type), `DefaultsHelpFormatter` (``--help`` shows each default once),
`silence_progress_bars` (what ``--no-progress`` does beyond our own bars), `check_model_path` (a missing local
model, refused before anything loads) and `apply_threads` (``--threads``).

Nothing here imports torch at import time: the parser must be built, and argument errors reported, at once.
"""

from __future__ import annotations

import argparse
import os

from ..default_model import DEFAULT_MODEL_NAME, is_default_model_name
from ..errors import UserError
from ..loading import looks_like_path
from ..choices import DEFAULT_MAX_BATCH_TOKENS, POOLING_MODES

DTYPES = ("auto", "float32", "bfloat16", "float16", "mixed")


def _int_at_least(minimum: int, described: str):
    """An argparse type for integers >= minimum: a clear message instead of a traceback or a silent zero."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {described}, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected {described}, got {value!r}")
        return number
    return parse


positive_int = _int_at_least(1, "a positive integer")  # counts and sizes
non_negative_int = _int_at_least(0, "an integer >= 0")  # counts that may be zero (e.g. --chunk-overlap)


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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that choose and configure the encoder to `parser`: --model, --peft-model, --pooling,
    --dtype, --max-length, --max-batch-tokens, --device and --threads (each unset one leaves the choice to the
    model, or to the library's default for the device)."""
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help=f"model directory or Hugging Face id, or '{DEFAULT_MODEL_NAME}' for the embedded model; "
                             f"for the released two-adapter layout, the MNTP directory (base config + adapter)")
    parser.add_argument("--peft-model", default=None, metavar="DIR",
                        help="an adapter applied on top of --model (e.g. the SimCSE or supervised adapter of a "
                             "released LLM2Vec model)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="pooling mode (default: the model's llm2vec_config.json, else mean)")
    # float32 by default, as the Python API: the faster modes move embeddings beyond float32's batch invariance,
    # so they are the user's choice, never a default.
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="model weights dtype; mixed: float32 weights with bf16 matmuls on CPU (faster, "
                             "embeddings move slightly); auto: on CPU, mixed where bf16 matmuls are native and "
                             "measure faster, else float32 (printed), on GPU the checkpoint's dtype")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per input, instruction included (default: the model's llm2vec_config.json, "
                             "else 512)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=None, help=_batch_tokens_help())
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when CUDA is present, else cpu; encode under "
                             "torchrun: cuda:LOCAL_RANK)")
    add_threads_option(parser)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add --threads (the CPU threads torch uses) to `parser`; `apply_threads` applies it."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice, OMP_NUM_THREADS or one per core); on "
                             "a machine other processes share, fewer threads than cores can be faster")


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count to --threads (None: leave torch's choice). Imports torch."""
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def _batch_tokens_help() -> str:
    # From the table of the encoder's defaults (copied into choices.py, which a test keeps equal to the
    # encoder's), so that --help neither goes stale nor imports torch.
    budgets = DEFAULT_MAX_BATCH_TOKENS
    return (f"tokens per batch (default: {budgets['cpu']} on CPU with float32 matmuls, {budgets['cpu-bf16']} with "
            f"bf16 ones (--dtype bfloat16 or mixed), {budgets['cuda']} on CUDA)")


def check_model_path(name: str | None, option: str = "--model") -> None:
    """Refuse a model that names a local path that does not exist, before anything is loaded (a Hugging Face id
    is left to the loader, which looks it up in the local cache). Raises UserError naming the fix."""
    if not name or is_default_model_name(name) or os.path.exists(name):
        return
    if looks_like_path(name):
        raise UserError(f"{option} {name!r}: no such directory. Pass the directory that holds the model's "
                        f"config.json (or an adapter's adapter_config.json), a Hugging Face id (owner/name) that is "
                        f"in the local cache, or '{DEFAULT_MODEL_NAME}' for the embedded model.")
