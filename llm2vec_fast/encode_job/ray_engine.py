"""`llm2vec-fast encode --engine ray`: the encode job on Ray Data, from one machine to a cluster.

The driver (the process running the command) plans the shards and owns the output directory; Ray does the rest:
- plan: one pass over the input's text columns, as the local path's scan, gives each shard's bad rows and
  sha256 (the same per-shard records the local path writes), so a bad row stops the run before anything starts;
- read: one Ray task per unfinished shard reads only that shard's rows (the row groups holding them) on whichever
  node runs it, and keeps the valid rows with their line (row) numbers;
- encode: `map_batches` over an actor pool (--ray-actors, each with --ray-cpus-per-actor CPUs or
  --ray-gpus-per-actor GPUs) of `ShardPredictor`s, which load the model once per actor and encode a shard's rows
  exactly as the local path encodes a shard;
- write: blocks come back in shard order (preserve_order) and the driver commits each shard with the local path's
  atomic writes and progress records, so resume, fingerprints, `load_embeddings` and the manifest are the same.
A killed actor or read task is restarted and its work retried by Ray; the driver checks every shard's line
numbers against the plan, so a lost or duplicated row is an error, never a silent gap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import faults
from ..errors import UserError
from ..model_checks import NO_REMOTE_CODE
from ..integrations.ray import LLM2VecPredictor
from ..quantization import stored_width
from . import sources, storage, tables
from .config import EncodeJobConfig
from .corpus import BadLine, InputSpec, Scan
from .pipeline import Throughput


@dataclass
class ShardPlan:
    """What the driver knows of shard `index` before encoding: its line range, bad lines and input sha256."""

    index: int
    first_line: int
    last_line: int
    sha256: str
    bad: list[BadLine]

    @property
    def valid_lines(self) -> list[int]:
        """The shard's line numbers that are encoded, in order."""
        bad = {b.line for b in self.bad}
        return [n for n in range(self.first_line, self.last_line + 1) if n not in bad]


def plan(spec: InputSpec, shard_size: int) -> tuple[list[ShardPlan], Scan]:
    """Every shard's plan and the input's Scan (line count and bad lines), from one pass over the table."""
    plans = []
    for shard in sources.read_shards(spec, shard_size, lambda index: True):
        plans.append(ShardPlan(shard.index, shard.index * shard_size + 1, shard.last_line, shard.sha256,
                               shard.parse().bad))
    return plans, Scan(plans[-1].last_line if plans else 0, [b for p in plans for b in p.bad])


def read_units(batch, columns: tables.TableColumns, fmt: str, counts: list[int]):
    """Ray task body: the valid rows of the shards in `batch` (columns shard, start, stop: global rows from 0) as a
    pyarrow Table with the columns shard, line, text, instruction and id (those the input has)."""
    pa = tables.pyarrow()
    out = []
    for shard, start, stop in zip(*(batch.column(c).to_pylist() for c in ("shard", "start", "stop"))):
        parts = [tables.read_piece(columns, fmt, piece) for piece in tables.pieces(columns, counts, start, stop)]
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        texts = table.column(columns.text).to_pylist()
        ids = table.column(columns.id).to_pylist() if columns.id is not None else None
        keep = [tables.row_problem(t, None if ids is None else ids[i], ids is not None) is None
                for i, t in enumerate(texts)]
        table = table.filter(pa.array(keep, pa.bool_()))
        lines = [start + 1 + i for i, k in enumerate(keep) if k]
        table = table.add_column(0, "line", pa.array(lines, pa.int64()))
        out.append(table.add_column(0, "shard", pa.array([shard] * len(lines), pa.int64())))
    return pa.concat_tables(out)


class ShardPredictor(LLM2VecPredictor):
    """`LLM2VecPredictor` that encodes each shard of a batch on its own (so a shard's embeddings do not depend on
    how Ray cut the blocks) and adds each row's token count (column tokens) for the throughput report."""

    calls = 0  # batches this actor was handed, counted by the fault point "ray-actor:N" (faults.py)

    def __call__(self, batch):
        self.calls += 1
        faults.point("ray-actor", self.calls)
        pa = self._pa
        pieces = []
        for start, stop in _runs(batch.column("shard").to_numpy()) or [(0, 0)]:
            embedded = super().__call__(batch.slice(start, stop - start))
            pieces.append(embedded.append_column("tokens", pa.array(self.last_token_counts, pa.int32())))
        return pa.concat_tables(pieces)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges of equal consecutive values."""
    if not len(values):
        return []
    cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
    bounds = [0, *cuts.tolist(), len(values)]
    return list(zip(bounds, bounds[1:]))


def encode_with_ray(config: EncodeJobConfig, model_dir: str, output, plans: list[ShardPlan], progress,
                    dim: int) -> Throughput:
    """Encode every unfinished shard of `plans` on Ray and commit it to `output` (an OutputDir) in order.

    config: the job, resolved (job.resolve_config); model_dir: its --model directory; progress: a tqdm-like bar;
    dim: the model's hidden size."""
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'llm2vec-fast[ray]'.") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.ray_address, log_to_driver=False, include_dashboard=False)
    try:
        return _run(ray, config, model_dir, output, plans, progress, dim)
    finally:
        if started_here:
            ray.shutdown()


def _run(ray, config: EncodeJobConfig, model_dir, output, plans, progress, dim) -> Throughput:
    spec = config.input_spec()
    columns = sources.columns(spec)
    counts = tables.file_row_counts(columns, spec.format)
    done = output.completed()
    todo = [p for p in plans if p.index not in done]
    throughput = Throughput()
    if not todo:
        return throughput
    store = storage.Storage.of(config, dim)
    # int8/uint8: the ranges are fixed before any shard, from a sample encoded on a worker (as an actor encodes).
    storage.write_ranges(config, output, dim, lambda: _calibrate(ray, config, model_dir, store))
    ranges = storage.read_ranges(config, output, dim)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the command draws its own bar; Ray's would interleave with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    units = ray.data.from_items([{"shard": p.index, "start": p.first_line - 1, "stop": p.last_line} for p in todo],
                                override_num_blocks=len(todo))
    # Reads take no CPU from the scheduler: they are light next to encoding and must not wait behind an actor pool
    # that holds every CPU. Without a CPU cost nothing bounds how many run at once, so `concurrency` does: one read
    # in flight per actor keeps every actor fed and the number of worker processes (and memory) fixed, whatever
    # the number of shards.
    rows = units.map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=0,
                             concurrency=config.ray_actors,
                             fn_kwargs={"columns": columns, "fmt": spec.format, "counts": counts})
    gpus = config.ray_gpus_per_actor
    # batch_size=None: one call per block, and each block is one shard's rows (one read task's output).
    embedded = rows.map_batches(
        ShardPredictor, batch_size=None, batch_format="pyarrow", concurrency=config.ray_actors,
        num_cpus=config.ray_cpus_per_actor, num_gpus=gpus or None,  # Ray Data restarts actors and retries by default
        fn_constructor_kwargs={
            "model": model_dir, "peft_model": config.peft_model, "text_field": columns.text,
            "instruction_field": columns.instruction or "", "instruction": spec.instruction,
            "pooling": config.pooling, "max_length": config.max_length, "dtype": config.dtype,
            "long_input": config.long_input, "chunk_overlap": config.chunk_overlap,
            "device": config.device, "normalize": config.normalize, "max_batch_tokens": config.max_batch_tokens,
            "num_threads": None if gpus else max(1, int(config.ray_cpus_per_actor)),
            "precision": config.precision, "truncate_dim": config.truncate_dim,
            "ranges": None if ranges is None else ranges.tolist(),
            "drop_columns": [c for c in (columns.text, columns.instruction) if c is not None]})
    width = stored_width(config.truncate_dim or dim, config.precision)
    writer = _ShardWriter(output, todo, width, config.shard_dtype, columns.id, progress, throughput)
    try:
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, (ValueError, UserError)):
            raise UserError(f"a Ray worker failed: {cause}") from None
        raise
    writer.finish()
    return throughput


def _calibrate(ray, config: EncodeJobConfig, model_dir: str, store: storage.Storage):
    """The int8/uint8 ranges of the first --calibration-rows input rows, encoded by one Ray task on the actors'
    resources (the driver may have no room for the model), then truncated and normalized here as locally."""
    pa = tables.pyarrow()
    pairs = storage.calibration_pairs(config.input_spec(), config.calibration_rows)
    table = pa.table({"instruction": [q for q, _ in pairs], "text": [t for _, t in pairs]},
                     schema=pa.schema([("instruction", pa.string()), ("text", pa.string())]))
    gpus = config.ray_gpus_per_actor
    kwargs = {"model": model_dir, "peft_model": config.peft_model, "pooling": config.pooling,
              "max_length": config.max_length, "dtype": config.dtype, "device": config.device,
              "long_input": config.long_input, "chunk_overlap": config.chunk_overlap,
              "normalize": store.normalize_in_encoder, "max_batch_tokens": config.max_batch_tokens,
              "num_threads": None if gpus else max(1, int(config.ray_cpus_per_actor))}
    task = ray.remote(_float_embeddings).options(num_cpus=config.ray_cpus_per_actor, num_gpus=gpus or None)
    return storage.ranges_from_sample(store, ray.get(task.remote(kwargs, table)), config)


def _float_embeddings(kwargs: dict, table) -> np.ndarray:
    """Ray task body: the float32 encoder output of a table's (instruction, text) rows."""
    return LLM2VecPredictor(**kwargs).embed(table)


class _ShardWriter:
    """Gathers the rows coming back from Ray, shard by shard in plan order, and commits each complete shard after
    checking its line numbers against the plan (nothing lost, duplicated or reordered)."""

    def __init__(self, output, todo: list[ShardPlan], dim: int, dtype: str, id_column: str | None, progress,
                 throughput: Throughput):
        self.output, self.todo, self.id_column = output, list(todo), id_column
        self.dim, self.dtype = dim, dtype
        self.progress, self.throughput = progress, throughput
        self.position = 0
        self.pending: list = []
        self.pending_rows = 0
        self._commit_empty()

    def add(self, batch) -> None:
        shards = batch.column("shard").to_numpy()
        for start, stop in _runs(shards):
            shard = int(shards[start])
            if self.position >= len(self.todo) or shard != self.todo[self.position].index:
                expected = self.todo[self.position].index if self.position < len(self.todo) else None
                raise RuntimeError(f"Ray returned rows of shard {shard} while shard {expected} was due: the output "
                                   f"order was not preserved; nothing of shard {shard} was written.")
            self.pending.append(batch.slice(start, stop - start))
            self.pending_rows += stop - start
            if self.pending_rows >= len(self.todo[self.position].valid_lines):
                self._commit()

    def _commit(self) -> None:
        import pyarrow as pa

        plan = self.todo[self.position]
        table = pa.concat_tables(self.pending) if self.pending else None
        lines = [] if table is None else table.column("line").to_pylist()
        if lines != plan.valid_lines:
            raise RuntimeError(f"shard {plan.index} came back from Ray with {len(lines)} rows for "
                               f"{len(plan.valid_lines)} lines (or other line numbers); nothing of it was written.")
        if table is None:
            embeddings = np.zeros((0, self.dim), self.dtype)
        else:
            column = table.column("embedding").combine_chunks()
            embeddings = column.flatten().to_numpy(zero_copy_only=False).reshape(len(lines), column.type.list_size)
        ids = None if self.id_column is None else [] if table is None else table.column(self.id_column).to_pylist()
        record = {"first_line": plan.first_line, "last_line": plan.last_line, "input_sha256": plan.sha256,
                  "skipped": [[b.line, b.reason] for b in plan.bad]}
        self.output.commit_shard(plan.index, embeddings, lines, record, ids)
        self.throughput.texts += len(lines)
        self.throughput.tokens += 0 if table is None else int(np.sum(table.column("tokens").to_numpy()))
        self.progress.update(len(lines))
        self.pending, self.pending_rows = [], 0
        self.position += 1
        self._commit_empty()

    def _commit_empty(self) -> None:
        # A shard whose lines are all bad sends no rows back: it is committed when its turn comes.
        if self.position < len(self.todo) and not self.todo[self.position].valid_lines:
            self._commit()

    def finish(self) -> None:
        """Raise unless every planned shard was committed."""
        if self.position != len(self.todo):
            missing = [p.index for p in self.todo[self.position:]]
            raise RuntimeError(f"Ray returned no rows for shards {missing[:10]}; re-run the same command to resume.")


def model_dim(model_dir: str) -> int:
    """The hidden size of the model in model_dir, read from its config without loading the weights (the driver of
    a cluster run may have no room for them)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, **NO_REMOTE_CODE).hidden_size
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the model config of {model_dir!r}: {error}") from None
