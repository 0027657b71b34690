"""Parquet shards of an encode output (--output-format parquet).

One file per shard, `shards/shard-000007.parquet`, one row group, columns:
    line       int64: the input line (or table row) number, counted from 1
    id         the row's --id-field value (int64 or string), only with --id-field
    embedding  fixed_size_list<float32, float16, int8 or uint8>[dim] (--precision; binary/ubinary: the packed
               bytes, dim = ceil(embedding_dim / 8))
so `datasets.load_dataset("parquet", ...)`, pyarrow, DuckDB or Spark read the output directly, and the sorted file
names give the rows in input order. `ParquetShards` is the format's `ShardFormat` (shard_formats.py); the file is
built in memory and written by shards.py's atomic write, as a .npy shard is. The embedding column is stored
uncompressed: float embeddings (and quantized codes) barely compress, and readers then copy nothing to decode them.
"""

from __future__ import annotations

import numpy as np

from .shard_formats import ShardFormat
from .tables import pyarrow

SUFFIX = ".parquet"
ID_TYPES = ("int64", "string")


def shard_bytes(embeddings: np.ndarray, line_numbers: list[int], ids: list | None, id_kind: str | None) -> bytes:
    """The bytes of one shard's Parquet file: embeddings [rows, dim], their line numbers and (id_kind given) ids."""
    pa = pyarrow()
    rows, dim = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings).reshape(-1))
    columns = {"line": pa.array(np.asarray(line_numbers, dtype=np.int64))}
    if id_kind is not None:
        columns["id"] = pa.array(ids, type=getattr(pa, id_kind)())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = pa.table(columns)
    sink = pa.BufferOutputStream()
    pa.parquet.write_table(table, sink, row_group_size=max(rows, 1),
                           compression={name: ("none" if name == "embedding" else "snappy") for name in columns},
                           write_statistics=[n for n in columns if n != "embedding"])
    return sink.getvalue().to_pybytes()


def num_rows(path: str) -> int:
    """The number of rows of a Parquet file, from its footer."""
    return pyarrow().parquet.read_metadata(path).num_rows


def embedding_layout(path: str) -> tuple[int, np.dtype] | None:
    """(dim, dtype) of the file's embedding column, or None when it has no fixed-size list column of floats or
    8-bit integers of that name."""
    pa = pyarrow()
    schema = pa.parquet.read_schema(path)
    if "embedding" not in schema.names:
        return None
    field_type = schema.field("embedding").type
    if not pa.types.is_fixed_size_list(field_type) or not (
            pa.types.is_floating(field_type.value_type) or field_type.value_type in (pa.int8(), pa.uint8())):
        return None
    return field_type.list_size, np.dtype(field_type.value_type.to_pandas_dtype())


def read_lines(path: str) -> np.ndarray:
    """The file's `line` column as int64 [rows]."""
    table = pyarrow().parquet.read_table(path, columns=["line"])
    return table.column("line").to_numpy().astype(np.int64, copy=False)


def read_embeddings(path: str) -> np.ndarray:
    """The file's embedding column as a [rows, dim] array."""
    pa = pyarrow()
    column = pa.parquet.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


class ParquetShards(ShardFormat):
    """One shard-K.parquet per shard (the functions above); read whole, never memory-mapped as an array."""

    name = "parquet"
    suffix = SUFFIX

    def encode(self, embeddings, line_numbers, ids, id_kind):
        return [(self.suffix, shard_bytes(embeddings, line_numbers, ids, id_kind))]

    def count(self, stem):
        try:
            return num_rows(stem + self.suffix)
        except (OSError, ValueError):  # pyarrow's errors derive from these
            return None

    def layout_problem(self, stem, name, dim, dtype):
        layout = embedding_layout(stem + self.suffix)
        if layout != (dim, np.dtype(dtype)):
            return f"{name}{self.suffix} has embeddings {layout}, expected ({dim}, {dtype})"
        return None

    def read_lines(self, path):
        return read_lines(path)

    def read_embeddings(self, path, mmap=False):
        return read_embeddings(path)
