"""Running an encode job (`EncodeJobConfig`) from start to end, on one process, under torchrun or on Ray.

The run: validate the config and the whole input (a bad line stops it before anything is encoded), resolve the
defaults that depend on the model (dtype, pooling, max_length), check the output directory against the
fingerprint (the config's identity, and the sha256 of the input, of every model file and of the --peft-model
adapter's files; a directory without any finished shard, left by a run that failed before encoding anything, is
reused whatever its fingerprint), then encode this rank's shards (shard k belongs to rank k % WORLD_SIZE),
skipping those already done, and refusing a shard with a non-finite embedding; finally rank 0 merges every rank's
progress into one index. See shards.py for the output layout and reader.py's `load_embeddings` to read it.
Messages name the command line's options, as the command line is what builds the config.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys

from tqdm.auto import tqdm

from ..errors import UserError
from ..loading import read_llm2vec_config, resolve_directory
from ..model_checks import NO_REMOTE_CODE
from .config import EncodeJobConfig
from .corpus import bad_lines_error, describe_bad_lines
from .distributed import ProcessGroup, Ranks, default_device
from .fingerprint import run_fingerprint
from .pipeline import ShardSource, Throughput, check_input_unchanged, encode_shard, finite_in_dtype, prefetched
from .shards import OutputDir
from . import storage
from .sources import check_input, columns, is_table, resolve_format, scan


def run(config: EncodeJobConfig) -> int:
    """Embed config.input into shards under config.output and return the exit status 0.

    Under torchrun this rank encodes its own shards and rank 0 writes the manifest; an interrupted run resumes, a
    complete one is left as it is. Bad input, bad options or a changed input raise UserError.
    """
    if config.output == "-":
        raise UserError("--output - (stdout) is not supported: encode writes a resumable directory of shards, not a "
                        "stream. Pass --output DIR and read the embeddings with "
                        "llm2vec_fast.encode_job.load_embeddings(DIR).")
    ranks = Ranks.from_env()
    config = dataclasses.replace(config, format=resolve_format(config.input, config.format, config.output))
    spec = config.input_spec()
    check_input(spec)
    if config.id_field is not None and config.output_format != "parquet":
        raise UserError("--id-field stores each row's id beside its embedding, which the .npy layout has no place "
                        "for; pass --output-format parquet (or leave --id-field out: line_numbers.npy then "
                        "identifies the rows).")
    if spec.is_stdin and ranks.world_size > 1:
        raise UserError("--input - (stdin) cannot be split across ranks; pass a file when running under torchrun.")
    model_dir = _resolve_model(config.model, "--model")
    adapter_dir = None if config.peft_model is None else _resolve_model(config.peft_model, "--peft-model")
    output = OutputDir(config.output, ranks.rank, config.output_format,
                       columns(spec).id_kind if is_table(spec) else None)
    recorded = None if config.overwrite else output.read_fingerprint()
    config = resolve_config(config, model_dir, adapter_dir, ranks, recorded)
    fingerprint = run_fingerprint(config, model_dir, adapter_dir)
    with output.lock():  # one run per output directory, from here to the manifest
        return _run_locked(config, spec, ranks, model_dir, fingerprint, output)


def _run_locked(config: EncodeJobConfig, spec, ranks: Ranks, model_dir: str, fingerprint: dict,
                output: OutputDir) -> int:
    output.check(fingerprint, config.overwrite)
    if not config.overwrite and output.is_complete():
        if spec.is_stdin:
            check_input_unchanged(spec, config.shard_size, output.completed())
        _say(ranks, f"{config.output} is already complete; nothing to do (pass --overwrite to encode again).")
        return 0

    plans = None
    if config.engine == "ray":
        _check_ray_engine(spec, ranks)
        from . import ray_engine

        plans, corpus = ray_engine.plan(spec, config.shard_size)
    else:
        corpus = None if spec.is_stdin else scan(spec)
    if corpus is not None and corpus.bad:
        if not config.skip_bad_lines:
            raise bad_lines_error(spec.name, corpus.bad)
        _say(ranks, f"skipping {len(corpus.bad)} bad line(s) of {spec.name} (--skip-bad-lines):\n"
                    + describe_bad_lines(spec.name, corpus.bad))

    if plans is not None:
        output.prepare(fingerprint, config.overwrite)
        dim = ray_engine.model_dim(model_dir)
        throughput = _encode_with_ray(config, model_dir, output, plans, corpus, dim)
        manifest = output.merge(len(plans), {**config.manifest_fields(dim), **storage.manifest_record(config, output)})
        _report(config, manifest, throughput, ranks)
        return 0

    with ProcessGroup(ranks) as group:
        if ranks.is_main:
            output.prepare(fingerprint, config.overwrite)
        group.barrier()
        model = _load_model(config, model_dir)
        store = storage.Storage.of(config, model.embedding_dim)
        if ranks.is_main:  # int8/uint8: the ranges every rank quantizes with, fixed before any shard
            storage.write_ranges(config, output, model.embedding_dim, lambda: _calibrate(config, model, store, ranks))
        group.barrier()
        store = dataclasses.replace(store, ranges=storage.read_ranges(config, output, model.embedding_dim))
        source = ShardSource(model, spec, config.shard_size, ranks.rank, ranks.world_size, output.completed(),
                             config.skip_bad_lines)
        throughput = _encode_own_shards(config, model, source, output, corpus, ranks, store)
        group.barrier()
        if ranks.is_main:
            manifest = output.merge(_ceil_div(source.num_lines, config.shard_size),
                                    {**config.manifest_fields(model.embedding_dim),
                                     **storage.manifest_record(config, output)})
            _report(config, manifest, throughput, ranks)
    return 0


def resolve_config(config: EncodeJobConfig, model_dir: str, adapter_dir: str | None, ranks: Ranks,
                   recorded: dict | None = None) -> EncodeJobConfig:
    """`config` with the defaults that depend on the model resolved, as the run's fingerprint records them: dtype
    ("auto": the precision the embeddings get), pooling and max_length (the model's llm2vec_config.json, else
    LLM2Vec's defaults), alike on every engine. model_dir, adapter_dir: the resolved --model and --peft-model
    directories; recorded: the fingerprint the output directory already holds (None: none, or --overwrite), whose
    choice for --dtype auto a resume keeps."""
    config = storage.resolve(config)
    recorded_dtype = (recorded or {}).get("dtype")
    config = dataclasses.replace(config, dtype=resolved_dtype(config, model_dir, ranks, recorded_dtype))
    if config.pooling is not None and config.max_length is not None:
        return config
    from ..encoder import LLM2Vec

    try:
        stored = read_llm2vec_config(adapter_dir if adapter_dir is not None else model_dir)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load {_model_description(config)}: {error}") from None
    defaults = inspect.signature(LLM2Vec.__init__).parameters
    return dataclasses.replace(
        config, pooling=config.pooling or stored.get("pooling_mode", defaults["pooling_mode"].default),
        max_length=config.max_length or stored.get("max_length", defaults["max_length"].default))


def _calibrate(config: EncodeJobConfig, model, store: storage.Storage, ranks: Ranks):
    """The int8/uint8 ranges of the first --calibration-rows input rows, encoded as a shard is."""
    _say(ranks, f"calibrating --precision {config.precision} on the first {config.calibration_rows} input rows")
    pairs = storage.calibration_pairs(config.input_spec(), config.calibration_rows)
    device = _device(config.device, ranks)
    with tqdm(disable=True) as silent:
        embeddings = encode_shard(model, model.tokenize_inputs(pairs) if pairs else [], device=device,
                                  normalize=store.normalize_in_encoder, max_batch_tokens=_budget(config, model, device),
                                  progress=silent, throughput=Throughput())
    return storage.ranges_from_sample(store, embeddings, config)


def _budget(config: EncodeJobConfig, model, device: str) -> int:
    return config.max_batch_tokens or model.max_batch_tokens or model.default_batch_tokens(device.split(":")[0])


def _encode_own_shards(config: EncodeJobConfig, model, source: ShardSource, output: OutputDir, corpus,
                       ranks: Ranks, store: storage.Storage) -> Throughput:
    """Encode and commit this rank's unfinished shards, the next one always being tokenized in the background;
    store: what becomes of the model's embeddings before they are written."""
    device = _device(config.device, ranks)
    budget = _budget(config, model, device)
    throughput = Throughput()
    total = initial = None
    if corpus is not None:  # a file: its scan tells how much work this rank has (stdin: unknown)
        counts = corpus.valid_lines_per_shard(config.shard_size)
        total = sum(n for k, n in enumerate(counts) if source.owns(k))
        initial = sum(n for k, n in enumerate(counts) if source.owns(k) and k in source.done)
    description = "encode" if ranks.world_size == 1 else f"encode (rank {ranks.rank})"
    try:
        with tqdm(total=total, initial=initial or 0, unit="text", desc=description, dynamic_ncols=True,
                  disable=not config.progress or not ranks.is_main) as progress:
            for shard in prefetched(source):
                embeddings = encode_shard(model, shard.rows, device=device, normalize=store.normalize_in_encoder,
                                          max_batch_tokens=budget, progress=progress, throughput=throughput)
                embeddings = finite_in_dtype(embeddings, store, shard, source.spec.name)
                record = {"first_line": shard.first_line, "last_line": shard.last_line,
                          "input_sha256": shard.parsed.sha256,
                          "skipped": [[b.line, b.reason] for b in shard.parsed.bad]}
                output.commit_shard(shard.index, embeddings, shard.parsed.line_numbers, record, shard.parsed.ids)
    except KeyboardInterrupt:
        print("llm2vec-fast: the shards written so far are kept; re-run the same command to resume.",
              file=sys.stderr)
        raise
    return throughput


def _check_ray_engine(spec, ranks: Ranks) -> None:
    if not is_table(spec):
        raise UserError(f"--engine ray reads Parquet or datasets inputs (Ray Data reads their row groups on the "
                        f"workers); {spec.name} is {spec.format}. Convert it to Parquet, or use --engine local.")
    if ranks.world_size > 1:
        raise UserError("--engine ray schedules its own workers; run it as one process, not under torchrun.")


def _encode_with_ray(config: EncodeJobConfig, model_dir: str, output: OutputDir, plans, corpus,
                     dim: int) -> Throughput:
    from .ray_engine import encode_with_ray

    done = output.completed()
    counts = corpus.valid_lines_per_shard(config.shard_size)
    with tqdm(total=sum(counts), initial=sum(n for k, n in enumerate(counts) if k in done), unit="text",
              desc="encode (ray)", dynamic_ncols=True, disable=not config.progress) as progress:
        try:
            return encode_with_ray(config, model_dir, output, plans, progress, dim)
        except KeyboardInterrupt:
            print("llm2vec-fast: the shards written so far are kept; re-run the same command to resume.",
                  file=sys.stderr)
            raise


def _resolve_model(name: str, option: str) -> str:
    try:
        return resolve_directory(name, option)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as error:
        raise UserError(str(error)) from None


# What a fingerprint may record as the resolution of --dtype auto and a resume can run again as it is ("auto" itself,
# Hugging Face's checkpoint dtype on a GPU, is not: on a CPU it would mean a new measurement).
_REUSABLE_DTYPES = ("float32", "mixed", "bfloat16", "float16")
_RAY_DTYPES = ("float32", "bfloat16", "float16")


def resolved_dtype(config: EncodeJobConfig, model_dir: str, ranks: Ranks, recorded: str | None = None) -> str:
    """--dtype with auto resolved once, before the fingerprint, so that it names the precision the embeddings get.

    auto resolves alike on every engine: to `recorded`, the dtype the output's fingerprint records (what auto
    chose when the output was started, by whichever engine), so that resuming with another engine or on another
    machine continues in the precision the finished shards have. Only for a new output (or --overwrite) is it
    chosen afresh: float32 under --engine ray (the workers may be other machines than this one), this machine's
    choice locally (precision.resolve_auto_dtype: measured on CPU, the checkpoint's dtype on a GPU)."""
    if config.engine == "ray" and config.dtype == "mixed":
        raise UserError("--dtype mixed is not available with --engine ray; pass --dtype float32 or bfloat16.")
    if config.dtype != "auto":
        return config.dtype
    if recorded in _REUSABLE_DTYPES:
        if config.engine == "ray" and recorded not in _RAY_DTYPES:
            raise UserError(f"--output {config.output!r} was started with --dtype auto resolved to {recorded!r}, "
                            f"which --engine ray cannot run; resume it with --engine local, or pass --overwrite to "
                            f"encode it again.")
        return recorded
    if config.engine == "ray":
        return "float32"  # workers may run on other machines
    from transformers import AutoConfig

    from ..precision import resolve_auto_dtype

    try:
        model_config = AutoConfig.from_pretrained(model_dir, **NO_REMOTE_CODE)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the config of --model {config.model!r}: {error}") from None
    return resolve_auto_dtype(model_config, device=_device(config.device, ranks),
                              max_batch_tokens=config.max_batch_tokens)


def _load_model(config: EncodeJobConfig, model_dir: str):
    import torch

    from ..encoder import LLM2Vec

    try:
        dtype = config.dtype if config.dtype in ("auto", "mixed") else getattr(torch, config.dtype)
        return LLM2Vec.from_pretrained(model_dir, peft_model_name_or_path=config.peft_model, dtype=dtype,
                                       pooling_mode=config.pooling, max_length=config.max_length,
                                       long_input=config.long_input, chunk_overlap=config.chunk_overlap)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise UserError(f"cannot load {_model_description(config)}: {error}") from None


def _model_description(config: EncodeJobConfig) -> str:
    return f"--model {config.model!r}" + (f" with --peft-model {config.peft_model!r}" if config.peft_model else "")


def _device(requested: str | None, ranks: Ranks) -> str:
    if requested is None:
        return default_device(ranks)
    if requested == "cuda" and ranks.world_size > 1:
        return f"cuda:{ranks.local_rank}"  # one GPU per process, as torchrun intends
    return requested


def _report(config: EncodeJobConfig, manifest: dict, throughput: Throughput, ranks: Ranks) -> None:
    skipped = manifest["skipped"]
    who = "this run" if ranks.world_size == 1 else "rank 0"
    print(f"llm2vec-fast: wrote {manifest['count']} embeddings (dim {manifest['embedding_dim']}, "
          f"{manifest['precision']}) in "
          f"{len(manifest['shards'])} shard(s) to {config.output}; {who}: {throughput.texts} texts in "
          f"{throughput.seconds:.1f} s ({throughput.rates()}).", file=sys.stderr)
    if skipped:
        lines = ", ".join(str(s["line"]) for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"llm2vec-fast: skipped {len(skipped)} bad line(s) (lines {lines}); all are listed in "
              f"{os.path.join(config.output, 'manifest.json')}.", file=sys.stderr)


def _say(ranks: Ranks, message: str) -> None:
    if ranks.is_main:
        print(f"llm2vec-fast: {message}", file=sys.stderr)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
