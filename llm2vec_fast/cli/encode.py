"""`llm2vec-fast encode`: embed a corpus file into resumable shards, on one process or many (torchrun).

This module is the command line only: its arguments become an `EncodeJobConfig` (llm2vec_fast/encode_job/config.py),
which llm2vec_fast/encode_job/job.py runs. See llm2vec_fast/encode_job/shards.py for the output layout and
`llm2vec_fast.encode_job.load_embeddings` to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ..errors import UserError
from ..settings import Ranks
from ..choices import (DEFAULT_CALIBRATION_ROWS, DEFAULT_SHARD_SIZE, ENGINES, INPUT_FORMATS as FORMATS, LONG_INPUTS,
                       MAX_LINE_BYTES, OUTPUT_FORMATS, PRECISIONS, SHARD_DTYPES)
from .options import (DefaultsHelpFormatter, add_model_options, apply_threads, check_model_path, non_negative_int,
                      positive_int, silence_progress_bars)


def register(subparsers) -> None:
    """Add the `encode` subcommand's parser to `subparsers` (what `add_subparsers` returned)."""
    parser = subparsers.add_parser(
        "encode", help="embed a text, JSON-lines, Parquet or datasets corpus into .npy or Parquet shards "
                       "(resumable, multi-process)",
        formatter_class=DefaultsHelpFormatter,
        description="Embed every line (table row) of a corpus into .npy or Parquet shards plus an index of input "
                    "line numbers. Re-running the same command resumes an interrupted run; it is refused when the "
                    "model's or the adapter's files, the input or an option that changes the embeddings differ. "
                    "Run it under torchrun to use several processes/GPUs/nodes.")
    add_model_options(parser)
    parser.add_argument("--input", required=True,
                        help="a .txt (one text per line) or .jsonl file, - for stdin, a .parquet file or a directory "
                             "of them, or a directory written by datasets' save_to_disk")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="output directory (created; resumed if it exists). Not a stream: '-' (stdout) is "
                             "refused, since a resumable run needs a directory; read the result with "
                             "llm2vec_fast.encode_job.load_embeddings(DIR)")
    parser.add_argument("--format", choices=("auto",) + FORMATS, default="auto",
                        help="input format; auto: from the file extension or the directory's files (stdin: txt)")
    parser.add_argument("--text-field", default="text", help="jsonl: the field holding the text; tables: the column")
    parser.add_argument("--instruction-field", default="instruction",
                        help="jsonl: the field holding a line's own instruction; tables: the column (optional: "
                             "rows without one, or tables without the column, use --instruction)")
    parser.add_argument("--id-field", default=None,
                        help="parquet/dataset: a column of integer or string ids stored with each embedding "
                             "(needs --output-format parquet); without it rows are identified by their row number")
    parser.add_argument("--instruction", default="",
                        help="instruction for every line that has none of its own")
    parser.add_argument("--prompt-name", default=None, metavar="NAME",
                        help="a sentence-transformers model's named prompt (its config_sentence_transformers.json "
                             "prompts, e.g. query) for every line that has no instruction of its own; without it "
                             "the model's default_prompt_name applies, if it has one")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="a prompt's text, put before every line's text that has no instruction of its own, as "
                             "sentence-transformers' prompt= (an LLM2Vec model takes it as the instruction)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--long-input", choices=LONG_INPUTS, default="truncate",
                        help="a text longer than --max-length: truncate (cut it, as llm2vec does, with a warning) "
                             "or chunk (embed all of it: windows of --max-length tokens, the instruction repeated "
                             "in each, averaged by their token counts; mean and weighted_mean pooling only)")
    parser.add_argument("--chunk-overlap", type=non_negative_int, default=0, metavar="N",
                        help="--long-input chunk: text tokens each window repeats from the end of the previous one")
    parser.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                        help="input lines per shard")
    parser.add_argument("--shard-dtype", choices=SHARD_DTYPES, default=None,
                        help="dtype of the stored embeddings: the older name of --precision float32|float16")
    storage = parser.add_argument_group(
        "storage", "smaller embeddings, as sentence-transformers makes them: truncate, then --normalize, then "
                   "quantize (docs/storage.md)")
    storage.add_argument("--precision", choices=PRECISIONS, default=None,
                         help="float32 (default) | float16 | int8 / uint8 (per-dimension buckets of fixed ranges) | "
                              "binary / ubinary (sign bits packed 8 per byte, as int8 offset by -128 / uint8)")
    storage.add_argument("--truncate-dim", type=positive_int, default=None, metavar="N",
                         help="keep the first N dimensions (Matryoshka models), before --normalize and quantization")
    storage.add_argument("--calibration-rows", type=positive_int, default=DEFAULT_CALIBRATION_ROWS, metavar="N",
                         help="int8/uint8 without --ranges: the ranges are the per-dimension min/max of the first N "
                              "input rows, fixed before the first shard and kept in the output (ranges.npy)")
    storage.add_argument("--ranges", default=None, metavar="FILE",
                         help="int8/uint8: a .npy file [2, dim] of per-dimension minima and maxima to quantize with "
                              "(e.g. another output's ranges.npy, so that both share buckets)")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="npy",
                        help="npy: shard-K.npy + shard-K.lines.npy; parquet: shard-K.parquet with the columns "
                             "line, id (--id-field) and embedding (a fixed-size list)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip lines that are not valid (reported, and listed in manifest.json) instead of "
                             "stopping")
    parser.add_argument("--max-line-bytes", type=positive_int, default=MAX_LINE_BYTES,
                        help=f"a longer input line is a bad line (refused, or skipped with --skip-bad-lines) and "
                             f"is never held in memory whole; lines end at \\n, \\r\\n or \\r "
                             f"(default: {MAX_LINE_BYTES}, 1 MiB)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the files an earlier encode wrote into --output instead of resuming them "
                             "(other files are kept; a directory encode did not write is refused)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (neither ours nor transformers' weight-loading bars)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print what the output directory already records (the dtype --dtype auto chose)")
    engine = parser.add_argument_group("engine", "where the model runs: this process (local; several under torchrun) "
                                                 "or a Ray cluster (parquet/dataset input)")
    engine.add_argument("--engine", choices=ENGINES, default="local",
                        help="local: this process encodes its shards; ray: Ray Data reads the shards and an actor "
                             "pool encodes them, this process writes the output (pip install 'llm2vec-fast[ray]')")
    engine.add_argument("--ray-address", default=None,
                        help="the Ray cluster to join (default: RAY_ADDRESS, else a new local Ray instance)")
    engine.add_argument("--ray-actors", type=positive_int, default=1,
                        help="actors in the pool, each holding one copy of the model")
    engine.add_argument("--ray-cpus-per-actor", type=positive_int, default=1,
                        help="CPUs per actor (its torch threads on a CPU actor)")
    engine.add_argument("--ray-gpus-per-actor", type=int, choices=(0, 1), default=0,
                        help="1: each actor gets one GPU and encodes on it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the encode job that `args` (the parsed `encode` arguments) describe and return the exit status 0.

    The mistakes a user makes first (a missing input or model, --output -) are refused before torch is imported;
    the one-time C++ build runs before the encode, so that its rate counts encoding only.
    """
    check_arguments(args)
    ranks = _ranks()
    load = _load_average()  # before this run's own threads add to it
    if args.no_progress:
        silence_progress_bars()
    apply_threads(args.threads)
    from ..encode_job import job

    config = config_from_args(args)
    finished = _recorded(args.output, "manifest.json") is not None and not args.overwrite
    on_cpu = config.engine == "local" and _device(config, ranks).startswith("cpu")
    if on_cpu and not finished:
        _build_native_ops()
    with _dtype_line(args):
        status = job.run(config)
    if on_cpu and not finished and ranks.is_main:
        _report_threads(load)
    return status


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse what needs no model to see: --output -, a missing --input, a local --model or --peft-model path that
    does not exist, --chunk-overlap without --long-input chunk (UserError). Cheap and without torch; the job checks
    the input in depth again."""
    if args.output == "-":
        raise UserError("--output - (stdout) is not supported: encode writes a resumable directory of shards, not a "
                        "stream. Pass --output DIR and read the embeddings with "
                        "llm2vec_fast.encode_job.load_embeddings(DIR).")
    if args.input != "-" and not os.path.exists(args.input):
        raise UserError(f"input file {args.input!r} does not exist; pass a .txt, .jsonl or .parquet file, a "
                        f"directory of Parquet files or of a datasets save, or - for stdin.")
    check_model_path(args.model, "--model")
    check_model_path(args.peft_model, "--peft-model")
    if args.chunk_overlap and args.long_input != "chunk":
        raise UserError(f"--chunk-overlap {args.chunk_overlap} applies to --long-input chunk only (truncate cuts a "
                        f"long text instead of splitting it into windows); add --long-input chunk, or leave "
                        f"--chunk-overlap out.")


def config_from_args(args: argparse.Namespace):
    """The EncodeJobConfig of the parsed `encode` arguments `args` (--no-progress becomes progress=False)."""
    from ..encode_job.config import EncodeJobConfig

    values = vars(args)
    return EncodeJobConfig(progress=not args.no_progress,
                           **{name: values[name] for name in EncodeJobConfig.field_names() if name != "progress"})


def _ranks() -> Ranks:
    try:
        return Ranks.from_env()
    except ValueError as error:
        raise UserError(str(error)) from None


def _device(config, ranks: Ranks) -> str:
    """The device this process encodes on (as the job chooses it)."""
    if config.device is not None:
        return config.device
    from ..encode_job.distributed import default_device

    return default_device(ranks)


def _recorded(output: str, name: str) -> dict | None:
    """The JSON object `name` in the output directory (manifest.json, fingerprint.json), or None."""
    try:
        with open(os.path.join(output, name)) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _records_dtype(output: str) -> bool:
    """Whether the output already records the dtype its run resolved (its manifest, or the fingerprint an
    interrupted run left): the dtype line was printed when that run started."""
    manifest = _recorded(output, "manifest.json") or {}
    fingerprint = _recorded(output, "fingerprint.json") or {}
    return "model_dtype" in manifest or "dtype" in fingerprint


def _dtype_line(args: argparse.Namespace):
    """Where the dtype --dtype auto chose may be printed: once per output directory (an output that records its
    dtype had the line when its run started), always with --verbose."""
    if args.verbose or args.overwrite or not _records_dtype(args.output):
        return contextlib.nullcontext()
    from ..cpu_linear import quiet_dtype_announcement

    return quiet_dtype_announcement()


def _build_native_ops() -> None:
    """Load the C++ CPU ops now, building them the first time (~30 s, announced with its duration), so that the
    build is neither counted in the encode's rate nor shown as a stalled progress bar. Never raises: without a
    compiler the encode keeps the PyTorch path, as `native` warns."""
    from .. import native

    native.load()


def _report_threads(load: float | None) -> None:
    """After the rate line: how many CPU threads the encode ran on (its rate depends on it, and --threads changes
    it), and a hint when other processes kept every core busy (`load`: the load average before the run)."""
    import torch

    threads = torch.get_num_threads()
    print(f"llm2vec-fast: encoded on {threads} CPU thread{'s' if threads != 1 else ''} (--threads N to change).",
          file=sys.stderr)
    _hint_if_busy(load, threads)


def _load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _hint_if_busy(load: float | None, threads: int) -> None:
    """One line when other processes kept every core busy: the encode then got a share of them, and fewer
    threads (--threads) often run faster than one per core."""
    cpus = os.cpu_count() or 1
    if load is not None and load > cpus and threads > 1:
        print(f"llm2vec-fast: this machine was busy (load average {load:.1f} on {cpus} CPUs): the encode shared its "
              f"cores and ran slower; --threads N with N below {threads} may be faster.", file=sys.stderr)
