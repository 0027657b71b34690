"""`llm2vec-fast export`: write a model (adapters merged) as a sentence-transformers directory.

The directory loads with plain `SentenceTransformer(DIR)` or `transformers.AutoModel` (bidirectional through
`is_causal: false`), without llm2vec-fast and without trust_remote_code; docs/export.md says what it holds, which
settings are refused and why, and the parity measured. Options, paths, prompts and --output are checked before
torch is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .options import DefaultsHelpFormatter, add_threads_option, apply_threads, check_model_path, positive_int
from ..choices import POOLING_MODES
from ..default_model import DEFAULT_MODEL_NAME
from ..errors import UserError

_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    """Add the `export` subcommand's parser to `subparsers`."""
    parser = subparsers.add_parser(
        "export", help="write a model (adapters merged) as a sentence-transformers directory",
        formatter_class=DefaultsHelpFormatter,
        description="Write a model, with its adapters merged, as a directory that plain sentence-transformers "
                    "(SentenceTransformer(DIR)) and transformers (AutoModel) load, bidirectional, without "
                    "llm2vec-fast or trust_remote_code. Settings it cannot express are refused (docs/export.md).")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME,
                        help=f"model directory or Hugging Face id, or '{DEFAULT_MODEL_NAME}'; for the released "
                             f"two-adapter layout, the MNTP directory (base config + adapter)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a PEFT adapter merged into the model; repeat for several, merged in order (e.g. the "
                             "SimCSE or supervised adapter on top of an MNTP --model)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the directory to write (new or empty)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="pooling mode (default: the last adapter's llm2vec_config.json, else the model's, else "
                             "mean)")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per input, written as max_seq_length (default: llm2vec_config.json, else 512)")
    parser.add_argument("--no-skip-instruction", action="store_true",
                        help="pool the instruction's tokens too (as llm2vec's skip_instruction=False)")
    parser.add_argument("--causal", action="store_true",
                        help="export the model causal (as loaded with enable_bidirectional=False)")
    parser.add_argument("--normalize", action="store_true",
                        help="append a Normalize module: unit-length embeddings")
    parser.add_argument("--prompt", action="append", default=[], metavar="NAME=INSTRUCTION",
                        help="a named prompt: SentenceTransformer(DIR).encode(texts, prompt_name=NAME) embeds like "
                             "[INSTRUCTION, text] pairs here; repeat for several")
    parser.add_argument("--default-prompt", default=None, metavar="NAME",
                        help="the prompt used when encode names none (one of the --prompt names)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32",
                        help="dtype the adapters are merged in and the weights are written in")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --output (a directory holding anything else is refused)")
    add_threads_option(parser)
    parser.set_defaults(func=run)


def parse_prompts(values: list[str]) -> dict:
    """{NAME: INSTRUCTION} of the --prompt values, or UserError for one without NAME= or a repeated NAME."""
    prompts = {}
    for value in values:
        name, equals, text = value.partition("=")
        if not equals or not name.strip():
            raise UserError(f"--prompt {value!r}: write NAME=INSTRUCTION, e.g. --prompt 'query=Retrieve relevant "
                            f"passages:'.")
        name = name.strip()
        if name in prompts:
            raise UserError(f"--prompt {name!r} is given twice; give each name once.")
        prompts[name] = text
    return prompts


def run(args: argparse.Namespace) -> int:
    """Export --model (with the --adapter directories merged) into --output; returns 0.

    Everything that needs no model (paths, prompts, --output) is refused as a UserError before torch is imported.
    """
    from ..export import check_output_directory, check_prompts

    prompts = parse_prompts(args.prompt)
    if args.default_prompt is not None and args.default_prompt not in prompts:
        raise UserError(f"--default-prompt {args.default_prompt!r} names no --prompt; the prompts given are "
                        f"{', '.join(sorted(prompts)) or 'none'}.")
    check_model_path(args.model, "--model")
    for adapter in args.adapter:
        check_model_path(adapter, "--adapter")
    try:
        check_prompts(prompts, args.default_prompt)
        check_output_directory(args.output, args.overwrite)
    except (FileExistsError, ValueError) as error:
        raise UserError(_with_option(str(error))) from None
    apply_threads(args.threads)
    import torch

    from ..export import export_from_pretrained

    encoder_args = {"pooling_mode": args.pooling, "max_length": args.max_length,
                    "dtype": getattr(torch, args.dtype), "enable_bidirectional": not args.causal}
    if args.no_skip_instruction:
        encoder_args["skip_instruction"] = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            said = export_from_pretrained(args.model, args.output, adapters=args.adapter, normalize=args.normalize,
                                          prompts=prompts, default_prompt_name=args.default_prompt,
                                          overwrite=args.overwrite, **encoder_args)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise UserError(_with_option(str(error))) from None
    for warning in caught:  # the export's own are printed below, once, as notes
        if str(warning.message) not in said:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    for message in said:
        print(f"llm2vec-fast export: note: {message}", file=sys.stderr)
    print(f"exported to {os.path.abspath(args.output)}: load it with SentenceTransformer({args.output!r})")
    return 0


def _with_option(message: str) -> str:
    """The library's messages name its keyword arguments; the command line's user knows the flags."""
    return (message.replace("normalize=True (--normalize)", "--normalize")
            .replace("overwrite=True (--overwrite)", "--overwrite")
            .replace("pooling_mode=", "--pooling ").replace("skip_instruction=False", "--no-skip-instruction"))
