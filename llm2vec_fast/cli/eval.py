"""`llm2vec-fast eval similarity|probe`: evaluate an encoder without any download.

- similarity: Pearson and Spearman correlation of cosine similarity with human scores, on scored pair files
  (STS-B TSV, 3-column TSV, JSONL) and/or the Lee et al. (2005) documents shipped in gensim's test data.
- probe: the LLM2Vec paper's word-level probe (frozen encoder, dropout + linear layer) on CoNLL-format files.
Both print a table and write the full results as JSON with --output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from ..errors import UserError
from .options import (DefaultsHelpFormatter, add_model_options, apply_threads, check_model_path, positive_int,
                      silence_progress_bars)


def register(subparsers) -> None:
    """Add the `eval` subcommand's parser, with its `similarity` and `probe` subcommands, to `subparsers`."""
    parser = subparsers.add_parser("eval", help="evaluate an encoder (similarity correlations, word-level probe)",
                                   description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    similarity = commands.add_parser(
        "similarity", help="Pearson/Spearman of cosine similarity vs human scores",
        formatter_class=DefaultsHelpFormatter,
        description="Correlation of embedding cosine similarity with human similarity scores. Pair files: an "
                    "STS-B style TSV (header with sentence1, sentence2, score), a 3-column TSV (sentence1, "
                    "sentence2, score) or JSONL with sentence1/sentence2/score. Without --data or --builtin, the "
                    "Lee et al. (2005) pairs from gensim's test data are used.")
    _model_arguments(similarity)
    similarity.add_argument("--data", action="append", default=[], metavar="FILE",
                            help="a scored pair file (.tsv / .txt / .jsonl); repeat for several")
    similarity.add_argument("--lee", action="store_true",
                            help="also evaluate on the Lee et al. (2005) pairs (the default without --data; needs "
                                 "gensim); the same as --builtin lee")
    similarity.add_argument("--builtin", action="append", default=[], choices=("lee", "simlex999", "wordsim353"),
                            help="a scored set from gensim's test data: lee (50 news documents, 1,225 pairs), "
                                 "simlex999 or wordsim353 (word pairs); repeat for several")
    similarity.add_argument("--score-field", default="score", help="the score field/column name")
    similarity.add_argument("--instruction", default="", help="instruction applied to both texts of every pair")
    similarity.add_argument("--batch-size", type=positive_int, default=None, help="at most this many texts per batch")
    similarity.set_defaults(func=run_similarity)

    probe = commands.add_parser(
        "probe", help="word-level linear probe (POS, chunking, NER) on CoNLL files",
        formatter_class=DefaultsHelpFormatter,
        description="Train dropout + a linear layer on the frozen encoder's word representations (CoNLL files: "
                    "word POS chunk NER columns, blank lines between sentences) and report accuracy, the "
                    "majority-class baseline and, for BIO tags, entity-level F1.")
    _model_arguments(probe)
    probe.add_argument("--train", required=True, metavar="FILE", help="CoNLL training file")
    probe.add_argument("--eval", action="append", required=True, metavar="FILE",
                       help="CoNLL dev/test file to score; repeat for several")
    probe.add_argument("--task", choices=("pos", "chunk", "ner"), default=None,
                       help="label column by task (CoNLL-2003: pos=1, chunk=2, ner=3; default: ner)")
    probe.add_argument("--column", type=int, default=None, help="label column index (0 = the word); overrides --task")
    probe.add_argument("--word-repr", choices=("first", "mean"), default="first",
                       help="a word's vector: its first sub-word token or the mean of its tokens")
    probe.add_argument("--next-token", action="store_true",
                       help="MNTP alignment: represent a word by the states one token to its left")
    probe.add_argument("--epochs", type=positive_int, default=5, help="probe training epochs")
    probe.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate")
    probe.add_argument("--probe-batch-size", type=positive_int, default=64, help="words per probe step")
    probe.add_argument("--seed", type=int, default=0, help="probe initialisation and shuffling seed")
    probe.set_defaults(func=run_probe)


def _model_arguments(parser) -> None:
    add_model_options(parser)
    parser.add_argument("--causal", action="store_true", help="keep the decoder causal (the uni-directional baseline)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (neither ours nor transformers' weight-loading bars)")


def load_encoder(args):
    """The LLM2Vec encoder that args name (--model, --peft-model, --causal, --dtype, --pooling, --max-length).

    A model that cannot be loaded raises UserError.
    """
    if args.no_progress:
        silence_progress_bars()  # before loading: transformers draws its "Loading weights" bar there
    apply_threads(args.threads)
    import torch

    from ..encoder import LLM2Vec

    encoder_args = {k: v for k, v in (("pooling_mode", args.pooling), ("max_length", args.max_length)) if v is not None}
    try:
        dtype = args.dtype if args.dtype in ("auto", "mixed") else getattr(torch, args.dtype)
        return LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft_model,
                                       enable_bidirectional=not args.causal, dtype=dtype,
                                       **encoder_args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load model {args.model!r}: {error}") from None


def check_models(args) -> None:
    """Refuse a local --model / --peft-model path that does not exist before anything is imported or read."""
    check_model_path(args.model, "--model")
    check_model_path(args.peft_model, "--peft-model")


def _model_info(args, encoder) -> dict:
    return {"model": args.model, "peft_model": args.peft_model, "bidirectional": not args.causal,
            "pooling": encoder.pooling_mode, "dtype": args.dtype, "max_length": encoder.max_length}


def check_output(path: str | None, inputs: list, models: list) -> None:
    """Refuse an --output that is a link, one of the input files, or inside a model directory, before any work:
    writing there would follow the link or destroy the input or the model."""
    if not path:
        return
    if os.path.islink(path):
        raise UserError(f"--output {path!r} is a symbolic link; pass the path of a regular file.")
    if os.path.isdir(path):
        raise UserError(f"--output {path!r} is a directory; pass a file name such as results.json.")
    target = os.path.realpath(path)
    for name in inputs:
        if name and os.path.exists(name) and os.path.realpath(name) == target:
            raise UserError(f"--output {path!r} is the input file {name!r}; writing the results would destroy it. "
                            f"Pass another --output.")
    for model in models:
        if model and os.path.isdir(model):
            root = os.path.realpath(model)
            if os.path.commonpath([target, root]) == root:
                raise UserError(f"--output {path!r} is inside the model directory {model!r}; writing there could "
                                f"replace a model file. Pass an --output outside it.")


def _write(path: str | None, payload: dict) -> None:
    """Write the results as JSON, atomically (no half-written file) and never through a link; JSON has no NaN:
    an undefined value is null."""
    from ..files import write_atomic

    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    write_atomic(path, (json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    print(f"results written to {path}")


def _json_safe(value):
    """`value` with every non-finite float (an undefined metric) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_similarity(args: argparse.Namespace) -> int:
    """Run `eval similarity` and return the exit status 0.

    Correlates cosine similarity with the human scores of each pair set (the --data files, the --builtin sets,
    Lee et al. when neither is given), prints the table and writes it as JSON to --output when given.
    """
    check_models(args)
    check_output(args.output, args.data, [args.model, args.peft_model])
    from ..evaluation.similarity import BUILTIN_PAIRS, PairsDataError, encoder_embed, evaluate_pairs, format_table, \
        read_pairs

    builtin = list(dict.fromkeys((["lee"] if args.lee or not (args.data or args.builtin) else []) + args.builtin))
    datasets = []
    try:
        for path in args.data:
            datasets.append(read_pairs(path, args.score_field))
        for name in builtin:
            datasets.append(BUILTIN_PAIRS[name]())
    except (PairsDataError, RuntimeError, OSError) as error:
        raise UserError(str(error)) from None
    encoder = load_encoder(args)
    embed = encoder_embed(encoder, instruction=args.instruction, batch_size=args.batch_size,
                          max_batch_tokens=args.max_batch_tokens, show_progress_bar=not args.no_progress,
                          device=args.device)
    started = time.perf_counter()
    results = [evaluate_pairs(embed, pairs) for pairs in datasets]
    seconds = time.perf_counter() - started
    info = _model_info(args, encoder)
    title = (f"{args.model}{' + ' + args.peft_model if args.peft_model else ''} "
             f"({'bidirectional' if info['bidirectional'] else 'causal'}, {info['pooling']} pooling); "
             f"cosine vs human scores, correlations x 100")
    print(format_table(results, title))
    _write(args.output, {**info, "instruction": args.instruction, "seconds": round(seconds, 2), "results": results})
    return 0


def run_probe(args: argparse.Namespace) -> int:
    """Run `eval probe` and return the exit status 0.

    Trains a word-level linear probe on the labels of one column of args.train, scores it on every --eval file,
    prints the results and writes them as JSON to --output when given.
    """
    check_models(args)
    check_output(args.output, [args.train, *args.eval], [args.model, args.peft_model])
    from ..evaluation.probe import TASK_COLUMNS, ConllDataError, ProbeConfig, format_results, read_conll
    from ..evaluation.probe import run_probe as probe

    column = args.column if args.column is not None else TASK_COLUMNS[args.task or "ner"]
    try:
        train = read_conll(args.train, column)
        evaluations = {path: read_conll(path, column) for path in args.eval}
    except ConllDataError as error:
        raise UserError(str(error)) from None
    encoder = load_encoder(args)
    config = ProbeConfig(word_repr=args.word_repr, next_token=args.next_token, epochs=args.epochs,
                         learning_rate=args.learning_rate, batch_size=args.probe_batch_size, seed=args.seed,
                         max_batch_tokens=args.max_batch_tokens, device=args.device)
    started = time.perf_counter()
    report = probe(encoder, train, evaluations, config)
    report["seconds"] = round(time.perf_counter() - started, 2)
    print(format_results(report))
    _write(args.output, {**_model_info(args, encoder), "task": args.task, "column": column, **report})
    return 0
