"""The input of an encode run, whatever its kind: a line corpus (corpus.py: .txt, .jsonl, stdin) or an Arrow table
(tables.py: Parquet, a `datasets` directory). The job (cli/encode.py, pipeline.py) goes through these functions
only: resolve the format, check the input, identify it for the fingerprint, scan it for bad rows and read its
shards. For both kinds, shard k holds input lines (rows) k*S+1 .. (k+1)*S and bad ones are handled alike.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import UserError
from . import corpus, tables
from .corpus import BadLine, InputSpec, ParsedShard, Scan
from .fingerprint import file_sha256

FORMATS = corpus.FORMATS + tables.TABLE_FORMATS


def is_table(spec: InputSpec) -> bool:
    """True for a Parquet or `datasets` input."""
    return spec.format in tables.TABLE_FORMATS


def resolve_format(path: str, requested: str, exclude: str | None = None) -> str:
    """The input format: `requested` unless it is "auto", then the table layout's or the file extension's.
    exclude: a directory whose files are not the input's (the run's output)."""
    if requested != "auto":
        return requested
    if path != corpus.STDIN:
        if not os.path.exists(path):
            corpus.check_input(path)  # "does not exist" rather than a guess at the format
        found = tables.table_format(path, exclude)
        if found is not None:
            return found
        if os.path.isdir(path):
            raise UserError(f"input {path!r} is a directory with neither .parquet files nor a datasets state.json; "
                            f"pass a .txt, .jsonl or .parquet file, or a Parquet or datasets directory.")
    return corpus.resolve_format(path, requested)


def check_input(spec: InputSpec) -> None:
    """Raise UserError unless the input exists, is readable and fits its format and options."""
    if not is_table(spec):
        if spec.id_field is not None:
            raise UserError(f"--id-field reads a column of a Parquet or datasets input; {spec.name} is {spec.format}, "
                            f"whose rows the output identifies by their line numbers. Leave --id-field out.")
        corpus.check_input(spec.path)
        return
    if spec.is_stdin:
        raise UserError(f"--format {spec.format} cannot be read from stdin; pass a file or directory.")
    if not os.path.exists(spec.path):
        raise UserError(f"input {spec.path!r} does not exist.")
    if spec.format == "dataset" and not os.path.isdir(spec.path):
        raise UserError(f"--format dataset needs the directory datasets' save_to_disk wrote; {spec.path!r} is a file.")
    columns(spec)  # every file's schema: a missing column or a wrong type stops the run here


def columns(spec: InputSpec) -> tables.TableColumns:
    """The checked columns of a table input. Not cached: the files are listed and their footers read at each call
    (milliseconds), so a directory that changed between two runs in one process is never seen stale."""
    return tables.check_columns(spec.path, spec.format, spec.text_field, spec.instruction_field, spec.id_field,
                                spec.exclude)


def input_identity(spec: InputSpec) -> dict:
    """What identifies the input in an output's fingerprint: its path and the size and sha256 of its content (of
    every data file, in row order, for a table)."""
    if not is_table(spec):
        return corpus.input_identity(spec)
    files = columns(spec).files
    root = spec.path if os.path.isdir(spec.path) else os.path.dirname(spec.path)
    return {"input": os.path.abspath(spec.path), "input_size": sum(os.path.getsize(f) for f in files),
            "input_files": [[os.path.relpath(f, root), file_sha256(f)] for f in files]}


@dataclass
class InputShard:
    """One shard as read: index, sha256 of its content, last line (row) number, and `parse()` for its rows."""

    index: int
    sha256: str
    last_line: int
    parse: Callable[[], ParsedShard]


def read_shards(spec: InputSpec, shard_size: int, wanted: Callable[[int], bool],
                on_end: Callable[[int], None] | None = None) -> Iterator[InputShard]:
    """The shards whose index `wanted` accepts, in order; on_end gets the number of lines (rows) at the end."""
    if not is_table(spec):
        for raw in corpus.read_shards(spec, shard_size, wanted, on_end):
            yield InputShard(raw.index, raw.sha256, raw.lines[-1][0], functools.partial(corpus.parse_shard, raw, spec))
        return
    for shard in tables.read_table_shards(columns(spec), spec.format, shard_size, wanted, on_end):
        yield InputShard(shard.index, shard.sha256, shard.last_line,
                         functools.partial(_parse_table_shard, shard, spec, shard_size))


def _parse_table_shard(shard: tables.TableShard, spec: InputSpec, shard_size: int) -> ParsedShard:
    parsed = ParsedShard(shard.index, shard.sha256, [], [], [], None if shard.ids is None else [])
    first = shard.index * shard_size + 1
    for i, text in enumerate(shard.texts):
        row_id = None if shard.ids is None else shard.ids[i]
        instruction = None if shard.instructions is None else shard.instructions[i]
        problem = tables.row_problem(text, row_id, shard.ids is not None, instruction)
        if problem is not None:
            parsed.bad.append(BadLine(first + i, problem))
            continue
        parsed.line_numbers.append(first + i)
        parsed.pairs.append((spec.instruction if instruction is None else instruction, text))
        if parsed.ids is not None:
            parsed.ids.append(row_id)
    return parsed


def scan(spec: InputSpec) -> Scan:
    """Every line (row) checked once before any encoding, so a bad one at the end stops the run before it starts."""
    if not is_table(spec):
        return corpus.scan(spec)
    bad, count = [], [0]
    for shard in read_shards(spec, tables.BATCH_ROWS, lambda index: True, on_end=lambda n: count.__setitem__(0, n)):
        bad += shard.parse().bad
    return Scan(count[0], bad)
