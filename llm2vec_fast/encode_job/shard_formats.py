"""How one shard of an encode output is stored: `ShardFormat`, with one class per --output-format.

npy (`NpyShards`, here): shards/shard-K.npy holds the embeddings [rows, dim], shards/shard-K.lines.npy their input
line numbers (int64). parquet (`ParquetShards`, parquet_shards.py): one shards/shard-K.parquet with both, and the
rows' ids. The writer (shards.py) and the reader (reader.py) go through these classes only, so a format is defined
in one place.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from ..choices import OUTPUT_FORMATS


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (pickled objects refused)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardFormat:
    """One --output-format. Paths called `stem` are a shard's path without suffix ("shards/shard-000007", relative
    to the output directory, or the full path where a method reads the file).

    name: the --output-format value. suffix: the file holding the embeddings. lines_suffix: the separate file of
    line numbers, or None when the embeddings file holds them. can_mmap: whether `read_embeddings` can map the
    file instead of reading it."""

    name: str
    suffix: str
    lines_suffix: str | None = None
    can_mmap: bool = False

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every suffix a shard of this format has a file with."""
        return (self.suffix,) if self.lines_suffix is None else (self.lines_suffix, self.suffix)

    def manifest_entry(self, stem: str) -> dict:
        """The shard's files as manifest.json lists them: "file" and, for a separate line file, "lines_file"."""
        entry = {"file": stem + self.suffix}
        if self.lines_suffix is not None:
            entry["lines_file"] = stem + self.lines_suffix
        return entry

    def encode(self, embeddings: np.ndarray, line_numbers: list[int], ids: list | None,
               id_kind: str | None) -> list[tuple[str, bytes]]:
        """(suffix, file bytes) of each file of one shard, in the order they are to be written: the shard counts
        as in place once the last one is. ids: the rows' --id-field values, of type id_kind ("int64" or "string";
        None: no ids)."""
        raise NotImplementedError

    def count(self, stem: str) -> int | None:
        """The number of rows of the shard at `stem` (full path), or None when its files are missing, unreadable or
        disagree with each other."""
        raise NotImplementedError

    def layout_problem(self, stem: str, name: str, dim: int, dtype: str) -> str | None:
        """What is wrong with the embeddings of the shard at `stem` (full path; `name` in messages) for [rows, dim]
        of `dtype`, or None when nothing is."""
        raise NotImplementedError

    def read_lines(self, path: str) -> np.ndarray:
        """The line numbers (int64 [rows]) in the file at `path` (the lines file, or the shard file)."""
        raise NotImplementedError

    def read_embeddings(self, path: str, mmap: bool = False) -> np.ndarray:
        """The embeddings [rows, dim] in the shard file at `path`; mmap (can_mmap only): mapped, not read."""
        raise NotImplementedError


class NpyShards(ShardFormat):
    """shard-K.npy (embeddings) beside shard-K.lines.npy (line numbers); the embeddings can be memory-mapped."""

    name = "npy"
    suffix = ".npy"
    lines_suffix = ".lines.npy"
    can_mmap = True

    def encode(self, embeddings, line_numbers, ids, id_kind):
        return [(self.lines_suffix, npy_bytes(np.asarray(line_numbers, dtype=np.int64))),
                (self.suffix, npy_bytes(embeddings))]

    def count(self, stem):
        try:
            embeddings = np.load(stem + self.suffix, mmap_mode="r")
            lines = np.load(stem + self.lines_suffix, mmap_mode="r")
        except (OSError, ValueError):
            return None
        return embeddings.shape[0] if embeddings.shape[0] == lines.shape[0] else None

    def layout_problem(self, stem, name, dim, dtype):
        embeddings = np.load(stem + self.suffix, mmap_mode="r")
        if embeddings.shape[1:] != (dim,) or embeddings.dtype != np.dtype(dtype):
            return f"{name}.npy has shape {embeddings.shape} {embeddings.dtype}, expected [rows, {dim}] {dtype}"
        return None

    def read_lines(self, path):
        return np.load(path, allow_pickle=False)

    def read_embeddings(self, path, mmap=False):
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


@functools.cache
def all_formats() -> tuple[ShardFormat, ...]:
    """One instance of each format, in OUTPUT_FORMATS order."""
    # Imported here: parquet_shards.py imports this module for the base class.
    from .parquet_shards import ParquetShards

    return NpyShards(), ParquetShards()


def shard_format(name: str) -> ShardFormat:
    """The ShardFormat of --output-format `name` (one of OUTPUT_FORMATS)."""
    return next(f for f in all_formats() if f.name == name)
