"""`llm2vec-fast encode`: embed a corpus file into resumable shards, on one process or many (torchrun).

The run: validate the arguments and the whole input (a bad line stops it before anything is encoded), check the
output directory against the fingerprint (the arguments, and the sha256 of the input, of every model file and of
the --peft-model adapter's files; a directory without any finished shard, left by a run that failed before encoding
anything, is reused whatever its fingerprint), then encode this rank's shards (shard k belongs to rank
k % WORLD_SIZE), skipping those already done, and refusing a shard with a non-finite embedding; finally rank 0
merges every rank's progress into one index.
See llm2vec_fast/encode_job/shards.py for the output layout and `load_embeddings` to read it.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

from ..batching import POOLING_MODES
from .options import DefaultsHelpFormatter, positive_int, silence_progress_bars
from ..encode_job.corpus import MAX_LINE_BYTES, InputSpec, bad_lines_error, describe_bad_lines
from ..encode_job.distributed import ProcessGroup, Ranks, default_device
from ..errors import UserError
from ..encode_job.fingerprint import directory_sha256s
from ..loading import adapter_base_name, has_weights, is_adapter_directory, resolve_directory
from ..encode_job.pipeline import ShardSource, Throughput, check_input_unchanged, encode_shard, finite_in_dtype, prefetched
from ..encode_job.shards import OUTPUT_FORMATS, OutputDir
from ..encode_job.sources import FORMATS, check_input, columns, input_identity, is_table, resolve_format, scan

DTYPES = ("auto", "float32", "bfloat16", "float16", "mixed")
ENGINES = ("local", "ray")
SHARD_DTYPES = ("float32", "float16")
DEFAULT_SHARD_SIZE = 10_000
FINGERPRINT_VERSION = 2


def register(subparsers) -> None:
    """Add the `encode` subcommand's parser to `subparsers` (what `add_subparsers` returned)."""
    parser = subparsers.add_parser(
        "encode", help="embed a text, JSON-lines, Parquet or datasets corpus into .npy or Parquet shards "
                       "(resumable, multi-process)",
        formatter_class=DefaultsHelpFormatter,
        description="Embed every line (table row) of a corpus into .npy or Parquet shards plus an index of input "
                    "line numbers. Re-running the same command resumes an interrupted run. Run it under torchrun "
                    "to use several processes/GPUs/nodes.")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model directory or Hugging Face id, or 'smollm2-135m' for the embedded model; for the "
                             "released two-adapter layout, the MNTP directory (base config + adapter)")
    parser.add_argument("--peft-model", default=None, metavar="DIR",
                        help="an adapter applied on top of --model (e.g. the SimCSE or supervised adapter of a "
                             "released LLM2Vec model); its files are part of the output's fingerprint")
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
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="pooling mode (default: the model's llm2vec_config.json, else mean)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model weights dtype; mixed: float32 weights with bf16 matmuls on CPU; auto: on CPU, "
                             "mixed where bf16 matmuls are native and measure faster, else float32 (printed; "
                             "recorded in the fingerprint as the resolved value), on GPU the checkpoint's dtype")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="tokens per input, instruction included (default: the model's, else 512)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=None,
                        help="tokens per batch (default: 1024 on CPU, 32768 on GPU)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when CUDA is present, else cpu)")
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


def run(args) -> int:
    """Embed args.input into shards under args.output and return the exit status 0.

    Under torchrun this rank encodes its own shards and rank 0 writes the manifest; an interrupted run resumes, a
    complete one is left as it is. Bad input, bad options or a changed input raise UserError.
    """
    if args.no_progress:
        silence_progress_bars()
    if args.output == "-":
        raise UserError("--output - (stdout) is not supported: encode writes a resumable directory of shards, not a "
                        "stream. Pass --output DIR and read the embeddings with "
                        "llm2vec_fast.encode_job.load_embeddings(DIR).")
    ranks = Ranks.from_env()
    spec = InputSpec(args.input, resolve_format(args.input, args.format), args.text_field, args.instruction_field,
                     args.instruction, args.max_line_bytes, args.id_field)
    check_input(spec)
    if args.id_field is not None and args.output_format != "parquet":
        raise UserError("--id-field stores each row's id beside its embedding, which the .npy layout has no place "
                        "for; pass --output-format parquet (or leave --id-field out: line_numbers.npy then "
                        "identifies the rows).")
    if spec.is_stdin and ranks.world_size > 1:
        raise UserError("--input - (stdin) cannot be split across ranks; pass a file when running under torchrun.")
    model_dir = _resolve_model(args.model, "--model")
    adapter_dir = None if args.peft_model is None else _resolve_model(args.peft_model, "--peft-model")
    args.dtype = _resolved_dtype(args, model_dir, ranks)
    fingerprint = _fingerprint(args, spec, model_dir, adapter_dir)
    output = OutputDir(args.output, ranks.rank, args.output_format, columns(spec).id_kind if is_table(spec) else None)
    output.check(fingerprint, args.overwrite)
    if not args.overwrite and output.is_complete():
        if spec.is_stdin:
            check_input_unchanged(spec, args.shard_size, output.completed())
        _say(ranks, f"{args.output} is already complete; nothing to do (pass --overwrite to encode again).")
        return 0

    plans = None
    if args.engine == "ray":
        _check_ray_engine(spec, ranks)
        from ..encode_job import ray_engine

        plans, corpus = ray_engine.plan(spec, args.shard_size)
    else:
        corpus = None if spec.is_stdin else scan(spec)
    if corpus is not None and corpus.bad:
        if not args.skip_bad_lines:
            raise bad_lines_error(spec.name, corpus.bad)
        _say(ranks, f"skipping {len(corpus.bad)} bad line(s) of {spec.name} (--skip-bad-lines):\n"
                    + describe_bad_lines(spec.name, corpus.bad))

    if plans is not None:
        output.prepare(fingerprint, args.overwrite)
        settings = ray_engine.encoder_settings(model_dir, adapter_dir, args.pooling, args.max_length)
        throughput = _encode_with_ray(args, spec, model_dir, output, plans, corpus, settings)
        manifest = output.merge(len(plans), _meta(args, settings, spec))
        _report(args, manifest, throughput, ranks)
        return 0

    with ProcessGroup(ranks) as group:
        if ranks.is_main:
            output.prepare(fingerprint, args.overwrite)
        group.barrier()
        model = _load_model(args, model_dir)
        source = ShardSource(model, spec, args.shard_size, ranks.rank, ranks.world_size, output.completed(),
                             args.skip_bad_lines)
        throughput = _encode_own_shards(args, model, source, output, corpus, ranks)
        group.barrier()
        if ranks.is_main:
            manifest = output.merge(_ceil_div(source.num_lines, args.shard_size), _meta(args, model, spec))
            _report(args, manifest, throughput, ranks)
    return 0


def _encode_own_shards(args, model, source: ShardSource, output: OutputDir, corpus, ranks: Ranks) -> Throughput:
    """Encode and commit this rank's unfinished shards, the next one always being tokenized in the background."""
    device = _device(args.device, ranks)
    budget = args.max_batch_tokens or model.max_batch_tokens or model.default_batch_tokens(device.split(":")[0])
    throughput = Throughput()
    total = initial = None
    if corpus is not None:  # a file: its scan tells how much work this rank has (stdin: unknown)
        counts = corpus.valid_lines_per_shard(args.shard_size)
        total = sum(n for k, n in enumerate(counts) if source.owns(k))
        initial = sum(n for k, n in enumerate(counts) if source.owns(k) and k in source.done)
    description = "encode" if ranks.world_size == 1 else f"encode (rank {ranks.rank})"
    try:
        with tqdm(total=total, initial=initial or 0, unit="text", desc=description, dynamic_ncols=True,
                  disable=args.no_progress or not ranks.is_main) as progress:
            for shard in prefetched(source):
                embeddings = encode_shard(model, shard.rows, device=device, normalize=args.normalize,
                                          max_batch_tokens=budget, progress=progress, throughput=throughput)
                embeddings = finite_in_dtype(embeddings, args.shard_dtype, shard, source.spec.name)
                record = {"first_line": shard.first_line, "last_line": shard.last_line,
                          "input_sha256": shard.parsed.sha256,
                          "skipped": [[b.line, b.reason] for b in shard.parsed.bad]}
                output.commit_shard(shard.index, embeddings, shard.parsed.line_numbers, record, shard.parsed.ids)
    except KeyboardInterrupt:
        print("llm2vec-fast: the shards written so far are kept; re-run the same command to resume.",
              file=sys.stderr)
        raise
    return throughput


def _check_ray_engine(spec: InputSpec, ranks: Ranks) -> None:
    if not is_table(spec):
        raise UserError(f"--engine ray reads Parquet or datasets inputs (Ray Data reads their row groups on the "
                        f"workers); {spec.name} is {spec.format}. Convert it to Parquet, or use --engine local.")
    if ranks.world_size > 1:
        raise UserError("--engine ray schedules its own workers; run it as one process, not under torchrun.")


def _encode_with_ray(args, spec, model_dir, output, plans, corpus, settings):
    from ..encode_job.ray_engine import encode_with_ray

    done = output.completed()
    counts = corpus.valid_lines_per_shard(args.shard_size)
    with tqdm(total=sum(counts), initial=sum(n for k, n in enumerate(counts) if k in done), unit="text",
              desc="encode (ray)", dynamic_ncols=True, disable=args.no_progress) as progress:
        try:
            return encode_with_ray(args, spec, model_dir, output, plans, progress, settings.config.hidden_size)
        except KeyboardInterrupt:
            print("llm2vec-fast: the shards written so far are kept; re-run the same command to resume.",
                  file=sys.stderr)
            raise


def _resolve_model(name: str, option: str) -> str:
    try:
        return resolve_directory(name, option)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as error:
        raise UserError(str(error)) from None


def _resolved_dtype(args, model_dir: str, ranks: Ranks) -> str:
    """--dtype with auto resolved once, before the fingerprint, so that it names the precision the embeddings get."""
    if args.engine == "ray":
        if args.dtype == "mixed":
            raise UserError("--dtype mixed is not available with --engine ray; pass --dtype float32 or bfloat16.")
        return "float32" if args.dtype == "auto" else args.dtype  # workers may run on other machines
    if args.dtype != "auto":
        return args.dtype
    from transformers import AutoConfig

    from ..encoder import resolve_auto_dtype

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of --model {args.model!r}: {error}") from None
    return resolve_auto_dtype(config, device=_device(args.device, ranks), max_batch_tokens=args.max_batch_tokens)


def _load_model(args, model_dir: str):
    import torch

    from ..encoder import LLM2Vec

    # Unset options are left out so that the model's llm2vec_config.json supplies them.
    encoder_args = {k: v for k, v in (("pooling_mode", args.pooling), ("max_length", args.max_length)) if v is not None}
    try:
        dtype = args.dtype if args.dtype in ("auto", "mixed") else getattr(torch, args.dtype)
        return LLM2Vec.from_pretrained(model_dir, peft_model_name_or_path=args.peft_model, dtype=dtype,
                                       **encoder_args)
    except (FileNotFoundError, ValueError, OSError) as error:
        what = f"--model {args.model!r}" + (f" with --peft-model {args.peft_model!r}" if args.peft_model else "")
        raise UserError(f"cannot load {what}: {error}") from None


def _device(requested: str | None, ranks: Ranks) -> str:
    if requested is None:
        return default_device(ranks)
    if requested == "cuda" and ranks.world_size > 1:
        return f"cuda:{ranks.local_rank}"  # one GPU per process, as torchrun intends
    return requested


def _fingerprint(args, spec: InputSpec, model_dir: str, adapter_dir: str | None) -> dict:
    """Everything that changes the stored embeddings. Device and batch budget are left out on purpose: resuming
    with a smaller budget after an out-of-memory error must stay possible (their effect is float rounding).
    Without --peft-model the adapter keys are absent, and so are --output-format npy and an unset --id-field, so
    outputs written before those options existed still resume."""
    adapter = {} if adapter_dir is None else {"peft_model": _model_name(args.peft_model),
                                              "peft_model_files": directory_sha256s(adapter_dir)}
    layout = {k: v for k, v in (("output_format", args.output_format), ("id_field", spec.id_field))
              if v not in (None, "npy")}
    return {"version": FINGERPRINT_VERSION, "model": _model_name(args.model), **_model_identity(model_dir), **adapter,
            "pooling": args.pooling, "dtype": args.dtype, "max_length": args.max_length,
            "normalize": args.normalize, "shard_size": args.shard_size, "shard_dtype": args.shard_dtype,
            "format": spec.format, "text_field": spec.text_field, "instruction_field": spec.instruction_field,
            "instruction": spec.instruction, "max_line_bytes": spec.max_line_bytes, **layout, **input_identity(spec)}


def _model_name(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name


def _model_identity(model_dir: str) -> dict:
    """The sha256 of every file of the model directory that can change an embedding (config, weights, adapter,
    tokenizer, llm2vec_config.json), and of the base model's for an adapter directory without base weights."""
    identity = {"model_files": directory_sha256s(model_dir)}
    base_dir = _adapter_base_dir(model_dir)
    if base_dir is not None:
        identity["base_model_files"] = directory_sha256s(base_dir)
    return identity


def _adapter_base_dir(model_dir: str) -> str | None:
    if not is_adapter_directory(model_dir) or has_weights(model_dir):
        return None
    try:
        return resolve_directory(adapter_base_name(model_dir), "base model named in the adapter config")
    except (OSError, ValueError, TypeError, RuntimeError):
        return None  # loading the model reports this with its own clear error, before anything is encoded


def _meta(args, model, spec: InputSpec) -> dict:
    return {"dim": model.config.hidden_size, "dtype": args.shard_dtype, "model": args.model,
            "peft_model": args.peft_model,
            "pooling": model.pooling_mode, "max_length": model.max_length, "model_dtype": args.dtype,
            "normalized": args.normalize, "shard_size": args.shard_size, "input": spec.name,
            "format": spec.format, "instruction": spec.instruction, "id_field": spec.id_field}


def _report(args, manifest: dict, throughput: Throughput, ranks: Ranks) -> None:
    skipped = manifest["skipped"]
    who = "this run" if ranks.world_size == 1 else "rank 0"
    print(f"llm2vec-fast: wrote {manifest['count']} embeddings (dim {manifest['dim']}, {manifest['dtype']}) in "
          f"{len(manifest['shards'])} shard(s) to {args.output}; {who}: {throughput.texts} texts in "
          f"{throughput.seconds:.1f} s ({throughput.rates()}).", file=sys.stderr)
    if skipped:
        lines = ", ".join(str(s["line"]) for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"llm2vec-fast: skipped {len(skipped)} bad line(s) (lines {lines}); all are listed in "
              f"{os.path.join(args.output, 'manifest.json')}.", file=sys.stderr)


def _say(ranks: Ranks, message: str) -> None:
    if ranks.is_main:
        print(f"llm2vec-fast: {message}", file=sys.stderr)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
