"""`llm2vec-fast encode`: embed a corpus file into resumable shards, on one process or many (torchrun).

This module is the command line only: its arguments become an `EncodeJobConfig` (llm2vec_fast/encode_job/config.py),
which llm2vec_fast/encode_job/job.py runs. See llm2vec_fast/encode_job/shards.py for the output layout and
`llm2vec_fast.encode_job.load_embeddings` to read it.
"""

from __future__ import annotations

import argparse

from ..encode_job.config import DEFAULT_SHARD_SIZE, ENGINES, SHARD_DTYPES, EncodeJobConfig
from ..encode_job.corpus import MAX_LINE_BYTES
from ..encode_job.shard_formats import OUTPUT_FORMATS
from ..encode_job.sources import FORMATS
from .options import DefaultsHelpFormatter, add_model_options, positive_int, silence_progress_bars


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
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                        help="input lines per shard")
    parser.add_argument("--shard-dtype", choices=SHARD_DTYPES, default="float32",
                        help="dtype of the stored embeddings")
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
    """Run the encode job that `args` (the parsed `encode` arguments) describe and return the exit status 0."""
    if args.no_progress:
        silence_progress_bars()
    from ..encode_job import job

    return job.run(config_from_args(args))


def config_from_args(args: argparse.Namespace) -> EncodeJobConfig:
    """The EncodeJobConfig of the parsed `encode` arguments `args` (--no-progress becomes progress=False)."""
    values = vars(args)
    return EncodeJobConfig(progress=not args.no_progress,
                           **{name: values[name] for name in EncodeJobConfig.field_names() if name != "progress"})
