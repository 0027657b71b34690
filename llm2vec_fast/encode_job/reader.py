"""Reading a finished `llm2vec-fast encode` output back: `load_embeddings`.

Nothing in the directory is trusted: every path the manifest lists must lead to a file inside it (links
included), every shard must agree with the manifest and with line_numbers.npy, and (verify=True, the default)
every file must have the sha256 the manifest recorded when encode wrote it and every embedding must be finite, or
ValueError names the file.
With mmap=True the .npy shards are memory-mapped behind one lazy view (stacked.py) instead of copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ..files import sha256_file
from .layout import LINE_NUMBERS, MANIFEST
from ..choices import OUTPUT_FORMATS
from .shard_formats import ShardFormat, shard_format
from .stacked import StackedRows


class LoadedEmbeddings(tuple):
    """The pair (embeddings, line_numbers) that `load_embeddings` returns (unpack it as before), with what the
    manifest says of the stored form as attributes:

    precision: float32 | float16 | int8 | uint8 | binary | ubinary (--precision). embedding_dim: the vectors'
    dimension (after --truncate-dim; binary rows hold ceil(embedding_dim / 8) packed bytes). truncate_dim: the
    --truncate-dim of the run, or None. ranges: float32 [2, embedding_dim], the per-dimension [min, max] int8/uint8
    codes were quantized with (quantize queries with the same ranges), else None.
    """

    def __new__(cls, embeddings, line_numbers, *, precision: str, embedding_dim: int, truncate_dim: int | None,
                ranges: np.ndarray | None):
        loaded = super().__new__(cls, (embeddings, line_numbers))
        loaded.precision, loaded.embedding_dim, loaded.truncate_dim, loaded.ranges = \
            precision, embedding_dim, truncate_dim, ranges
        return loaded

    @property
    def embeddings(self):
        """The embeddings [N, stored width] (an array, or a StackedRows view with mmap=True)."""
        return self[0]

    @property
    def line_numbers(self) -> np.ndarray:
        """The input line (table row) number of each row, int64 [N], counted from 1."""
        return self[1]


def load_embeddings(output_dir: str, mmap: bool = False, verify: bool = True) -> LoadedEmbeddings:
    """Read a finished `llm2vec-fast encode` output.

    Returns (embeddings [N, dim] in the shard dtype, line_numbers int64 [N]): row i embeds input line (or table
    row) line_numbers[i], counted from 1. Rows are in input order; skipped lines are listed in manifest.json.
    The pair is a `LoadedEmbeddings`, whose attributes say the precision (int8/uint8 codes, or binary's packed
    bytes: dim = ceil(embedding_dim / 8)), the truncation and the int8/uint8 ranges.
    mmap: return the embeddings as a `StackedRows` view over the memory-mapped .npy shards instead of one array:
    nothing is copied or read until rows are indexed (``view[i:j]``, ``view[ids]``); `np.asarray(view)` makes the
    full copy. Parquet output (--output-format parquet) is read whole into one array; mmap=True is refused for it
    (read it with pyarrow or datasets, which map it themselves; see docs/cli.md).
    Every file read must lie inside output_dir (links included), and every shard must agree with the manifest
    and with line_numbers.npy; otherwise ValueError names the file.
    verify: also check each file's sha256 against the manifest (a shard swapped, replaced by another run's or
    edited is refused) and that every embedding is finite. This reads every shard once more (with mmap too);
    verify=False skips it, e.g. for an output written before llm2vec-fast recorded hashes.
    """
    manifest_path = os.path.join(output_dir, MANIFEST)
    if os.path.islink(manifest_path):
        raise _damaged(output_dir, f"{MANIFEST} is a symbolic link")
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{output_dir!r} has no {MANIFEST}: the encode run did not finish (re-run the same "
                                f"command to resume it) or this is not an llm2vec-fast encode output.")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        count, dim, dtype = int(manifest["count"]), int(manifest["dim"]), np.dtype(manifest["dtype"])
        shards = [_ShardEntry(s["file"], s.get("lines_file"), int(s["rows"]), int(s["row_start"]),
                              s.get("sha256")) for s in manifest["shards"]]
        index_name = manifest["line_numbers"]
        output_format = manifest.get("output_format", "npy")  # outputs written before Parquet existed: npy
        # Outputs written before --precision existed hold floats of all the model's dimensions.
        precision = manifest.get("precision") or dtype.name
        embedding_dim = int(manifest.get("embedding_dim") or dim)
        truncate_dim = manifest.get("truncate_dim")
        ranges = None if manifest.get("ranges") is None else np.asarray(manifest["ranges"], dtype=np.float32)
    except (ValueError, TypeError, KeyError) as error:
        raise _damaged(output_dir, f"{MANIFEST} is not a valid manifest ({error!r})") from None
    if output_format not in OUTPUT_FORMATS:
        raise _damaged(output_dir, f"{MANIFEST} names the output format {output_format!r}")
    if ranges is not None and ranges.shape != (2, embedding_dim):
        raise _damaged(output_dir, f"{MANIFEST} records ranges of shape {ranges.shape}, expected (2, {embedding_dim})")
    fmt = shard_format(output_format)
    if mmap and not fmt.can_mmap:
        raise ValueError(f"{output_dir!r} holds Parquet shards, which cannot be memory-mapped as arrays; call "
                         f"load_embeddings without mmap (one copy in memory), or open the shards with pyarrow or "
                         f"datasets.load_dataset('parquet', ...), which map the files themselves.")
    root = os.path.realpath(output_dir)
    if verify:
        _verify_hash(output_dir, root, index_name, manifest.get("line_numbers_sha256"))
        if manifest.get("ranges_file") is not None:
            _verify_hash(output_dir, root, manifest["ranges_file"], manifest.get("ranges_sha256"))
    line_numbers = _read(output_dir, index_name, lambda path: np.load(path, allow_pickle=False), root)
    if line_numbers.shape != (count,) or line_numbers.dtype != np.int64:
        raise _damaged(output_dir, f"{index_name} holds {line_numbers.shape} {line_numbers.dtype}, expected "
                                   f"{count} int64 line numbers")
    parts, row = [], 0
    for shard in shards:
        if verify:
            for name in filter(None, (shard.file, shard.lines_file)):
                _verify_hash(output_dir, root, name, (shard.sha256 or {}).get(name) if isinstance(shard.sha256, dict)
                             else None)
        embeddings, lines = _read_shard(output_dir, root, fmt, shard, mmap)
        _check_shard(output_dir, shard, embeddings, lines, line_numbers, row, dim, dtype)
        if verify and not np.isfinite(embeddings).all():
            bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
            raise _damaged(output_dir, f"{shard.file} holds non-finite embeddings (NaN or inf) in {bad.size} row(s), "
                                       f"the first for input line {int(lines[bad[0]])}")
        parts.append(embeddings)
        row += len(lines)
    if row != count:
        raise _damaged(output_dir, f"the shards hold {row} rows, {MANIFEST} says {count}")
    form = {"precision": precision, "embedding_dim": embedding_dim, "truncate_dim": truncate_dim, "ranges": ranges}
    if mmap:
        return LoadedEmbeddings(StackedRows(parts, dim, dtype), line_numbers, **form)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=dtype)
    return LoadedEmbeddings(embeddings, line_numbers, **form)


@dataclass(frozen=True)
class _ShardEntry:
    file: str
    lines_file: str | None  # None for a Parquet shard, which holds its line numbers
    rows: int
    row_start: int
    sha256: dict | None  # file name (as listed) -> sha256 recorded by encode; None in outputs written before that


def _read_shard(output_dir: str, root: str, fmt: ShardFormat, shard: _ShardEntry,
                mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings and line numbers of one shard the manifest lists."""
    embeddings = _read(output_dir, shard.file, lambda path: fmt.read_embeddings(path, mmap), root)
    lines_name = shard.file if fmt.lines_suffix is None else shard.lines_file
    return embeddings, _read(output_dir, lines_name, fmt.read_lines, root)


def _read(output_dir: str, name, read, root: str):
    """read(path) of file `name` (relative, as the manifest lists it), which must resolve to a file inside root
    (the real path of output_dir); a file that cannot be read is damage, named."""
    path = _inside(root, name, output_dir)
    try:
        return read(path)
    except (OSError, ValueError, KeyError) as error:  # pyarrow's errors derive from OSError / ValueError
        raise _damaged(output_dir, f"{name} cannot be read ({error})") from None


def _verify_hash(output_dir: str, root: str, name, expected) -> None:
    """Refuse file `name` unless its sha256 is `expected`, the hash the manifest recorded for it."""
    path = _inside(root, name, output_dir)
    if not isinstance(expected, str):
        raise _damaged(output_dir, f"{MANIFEST} records no sha256 for {name!r} (outputs of earlier llm2vec-fast "
                                   f"versions have none: read such an output with load_embeddings(..., verify=False))")
    try:
        actual = sha256_file(path)
    except OSError as error:
        raise _damaged(output_dir, f"{name} cannot be read ({error})") from None
    if actual != expected:
        raise _damaged(output_dir, f"{name} is not the file encode wrote (its sha256 differs from the one "
                                   f"{MANIFEST} records)")


def _inside(root: str, name, output_dir: str) -> str:
    """The path of file `name` (relative, as the manifest lists it), which must resolve to a file inside root."""
    if (not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")
            or not _is_inside(os.path.realpath(os.path.join(root, name)), root)):
        raise _damaged(output_dir, f"{MANIFEST} lists {name!r}, which is outside the output directory")
    return os.path.join(root, name)


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _check_shard(output_dir: str, shard: _ShardEntry, embeddings: np.ndarray, lines: np.ndarray,
                 line_numbers: np.ndarray, row: int, dim: int, dtype: np.dtype) -> None:
    """Refuse a shard whose shape, dtype, row count, position or line numbers disagree with the manifest and the
    index (line_numbers [count]); `row` is where the shard must start."""
    name, lines_name = shard.file, shard.lines_file or f"{shard.file}'s line column"
    if embeddings.ndim != 2 or embeddings.shape[1] != dim or embeddings.dtype != dtype:
        raise _damaged(output_dir, f"{name} holds {embeddings.shape} {embeddings.dtype}, expected [rows, {dim}] "
                                   f"{dtype}")
    if not embeddings.shape[0] == len(lines) == shard.rows or shard.row_start != row:
        raise _damaged(output_dir, f"{name} holds {embeddings.shape[0]} rows and {lines_name} {len(lines)}, "
                                   f"{MANIFEST} says {shard.rows} rows from row {shard.row_start} (expected from "
                                   f"row {row})")
    if not np.array_equal(lines, line_numbers[row:row + len(lines)]):
        raise _damaged(output_dir, f"{lines_name} does not match rows {row}..{row + len(lines) - 1} of "
                                   f"{LINE_NUMBERS}")


def _damaged(output_dir: str, problem: str) -> ValueError:
    return ValueError(f"{output_dir!r} cannot be trusted: {problem}. The output was changed after llm2vec-fast "
                      f"encode wrote it; re-run the encode command with --overwrite (or into a new --output).")
