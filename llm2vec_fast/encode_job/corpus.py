"""Reading encode's line corpora: a text file (one text per line), a JSON-lines file (an object per line with a
text field and an optional instruction field), or stdin in either format, cut into shards of line numbers.

Lines are read by the one line reader of every command (llm2vec_fast/lines.py: line endings, the byte-order mark,
overlong lines, trailing blank lines); a blank line inside a corpus is a bad line here (see lines.py for why).

Shard k holds input lines k*S+1 .. (k+1)*S (S = the shard size). Shards are defined by line numbers, not by the
valid lines before them, so a shard's content never depends on which rank reads it or on earlier bad lines.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..choices import LINE_FORMATS
from ..errors import UserError
from ..lines import (MAX_LINE_BYTES, OverlongLine, decode_line, json_kind, numbered_lines, parse_json_object,
                     surrogate_problem)
from .fingerprint import file_sha256

FORMATS = LINE_FORMATS
_FORMAT_OF_EXTENSION = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STDIN = "-"


@dataclass(frozen=True)
class InputSpec:
    """Where the corpus is and how to read one line of it.

    path: a file, or "-" for stdin; for the table formats (tables.py), a Parquet file or directory, or a
    `datasets` save_to_disk directory. format: "txt", "jsonl", "parquet" or "dataset".
    text_field, instruction_field: the JSON keys of a jsonl line (the column names of a table).
    instruction: used for every line that has no instruction of its own ("" = none).
    max_line_bytes: a longer line is a bad line, and is never held in memory.
    id_field: tables only: the column whose values identify the rows in the output (None: row numbers).
    exclude: tables only: a directory whose files are not part of the input (the run's output directory, which
    may lie inside a Parquet input directory); None: none.
    """

    path: str
    format: str
    text_field: str = "text"
    instruction_field: str = "instruction"
    instruction: str = ""
    max_line_bytes: int = MAX_LINE_BYTES
    id_field: str | None = None
    exclude: str | None = None

    @property
    def name(self) -> str:
        """The input's name in messages: its path, or "<stdin>"."""
        return "<stdin>" if self.path == STDIN else self.path

    @property
    def is_stdin(self) -> bool:
        """True when the input is standard input (path "-")."""
        return self.path == STDIN


@dataclass(frozen=True)
class BadLine:
    """An input line that cannot be encoded: its line number (from 1) and the reason."""

    line: int
    reason: str


@dataclass
class RawShard:
    """The raw lines of one shard. lines: (line number, bytes without the line ending, or an OverlongLine);
    sha256: of those lines."""

    index: int
    lines: list[tuple[int, bytes]] = field(default_factory=list)
    sha256: str = ""


@dataclass
class ParsedShard:
    """One shard's valid lines, in input order, and its bad lines; ids: the valid rows' --id-field values (tables
    with --id-field only, else None)."""

    index: int
    sha256: str
    line_numbers: list[int]
    pairs: list[tuple[str, str]]
    bad: list[BadLine]
    ids: list | None = None


@dataclass
class Scan:
    """A full pass over the input: how many lines it has and which of them are bad."""

    num_lines: int
    bad: list[BadLine]

    def valid_lines_per_shard(self, shard_size: int) -> list[int]:
        """The number of valid (not bad) lines in each shard of `shard_size` input lines, in shard order."""
        counts = [min(shard_size, self.num_lines - k * shard_size) for k in range(-(-self.num_lines // shard_size))]
        for b in self.bad:
            counts[(b.line - 1) // shard_size] -= 1
        return counts


def resolve_format(path: str, requested: str) -> str:
    """The input format: `requested` unless it is "auto", then the file extension's (stdin: txt)."""
    if requested != "auto":
        return requested
    if path == STDIN:
        return "txt"
    extension = os.path.splitext(path)[1].lower()
    if extension not in _FORMAT_OF_EXTENSION:
        raise UserError(f"cannot tell the format of {path!r} from its extension; pass --format txt, jsonl, "
                        f"parquet or dataset.")
    return _FORMAT_OF_EXTENSION[extension]


def check_input(path: str) -> None:
    """Raise UserError unless `path` is "-" (stdin) or a readable file that exists and is not a directory."""
    if path == STDIN:
        return
    if not os.path.exists(path):
        raise UserError(f"input file {path!r} does not exist.")
    if os.path.isdir(path):
        raise UserError(f"input {path!r} is a directory; pass a .txt or .jsonl file (or - for stdin).")
    if not os.access(path, os.R_OK):
        raise UserError(f"input file {path!r} is not readable (check its permissions).")


def input_identity(spec: InputSpec) -> dict:
    """What identifies the input file in an output's fingerprint: its path, size and the sha256 of its content.

    stdin cannot be hashed before it is read; there, each finished shard's own line hash guards a resume.
    """
    if spec.is_stdin:
        return {"input": STDIN}
    return {"input": os.path.abspath(spec.path), "input_size": os.path.getsize(spec.path),
            "input_sha256": file_sha256(spec.path)}


@contextmanager
def open_input(spec: InputSpec):
    """Context manager: the input as a binary stream, the file at spec.path (closed afterwards) or stdin's buffer."""
    if spec.is_stdin:
        yield sys.stdin.buffer
    else:
        with open(spec.path, "rb") as f:
            yield f


def read_shards(spec: InputSpec, shard_size: int, wanted: Callable[[int], bool],
                on_end: Callable[[int], None] | None = None) -> Iterator[RawShard]:
    """The raw shards whose index `wanted` accepts, in order; the other shards' lines are only counted.

    on_end: called with the number of lines of the corpus once the input is exhausted.
    """
    with open_input(spec) as stream:
        current: RawShard | None = None
        digest = None
        number = 0
        for number, raw in numbered_lines(stream, spec.max_line_bytes):
            index = (number - 1) // shard_size
            if current is None or current.index != index:
                if current is not None and digest is not None:
                    current.sha256 = digest.hexdigest()
                    yield current
                current = RawShard(index)
                digest = hashlib.sha256() if wanted(index) else None
            if digest is not None:
                current.lines.append((number, raw))
                digest.update((raw.digest_bytes() if isinstance(raw, OverlongLine) else raw) + b"\n")
        if current is not None and digest is not None:
            current.sha256 = digest.hexdigest()
            yield current
        if on_end is not None:
            on_end(number)


def parse_line(raw: bytes | OverlongLine, spec: InputSpec) -> tuple[str, str]:
    """(instruction, text) of one line; raises ValueError whose message says why the line is bad."""
    line = decode_line(raw, overlong_fix="split or shorten it, or raise --max-line-bytes")
    if spec.format == "txt":
        text, instruction = line, None
    else:
        if not line.strip():
            raise ValueError("empty line (expected a JSON object)")
        record = parse_json_object(line, f"an object with a {spec.text_field!r} field")
        if spec.text_field not in record:
            raise ValueError(f"no {spec.text_field!r} field (fields: {', '.join(map(repr, record)) or 'none'})")
        text = record[spec.text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {spec.text_field!r} is {json_kind(text)}, expected a string")
        instruction = record.get(spec.instruction_field)
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"field {spec.instruction_field!r} is {json_kind(instruction)}, expected a string")
        # A JSON escape can put a lone surrogate into a string that UTF-8 could never hold (txt lines cannot get
        # one: decode_line refuses its UTF-8-like bytes). Found here, by the scan, not by the tokenizer mid-run.
        for name, value in ((spec.text_field, text), (spec.instruction_field, instruction)):
            problem = None if value is None else surrogate_problem(value)
            if problem is not None:
                raise ValueError(f"field {name!r} holds {problem}")
    if not text.strip():
        raise ValueError("empty text" if not text else "whitespace-only text")
    return (spec.instruction if instruction is None else instruction), text


def parse_shard(raw: RawShard, spec: InputSpec) -> ParsedShard:
    """The ParsedShard of `raw`: (instruction, text) and line number of each valid line, a BadLine per other line."""
    parsed = ParsedShard(raw.index, raw.sha256, [], [], [])
    for number, line in raw.lines:
        try:
            pair = parse_line(line, spec)
        except ValueError as error:
            parsed.bad.append(BadLine(number, str(error)))
            continue
        parsed.line_numbers.append(number)
        parsed.pairs.append(pair)
    return parsed


def scan(spec: InputSpec) -> Scan:
    """Parse every line once, before any encoding, so a bad line at the end stops the run before it starts."""
    num_lines, bad = 0, []
    with open_input(spec) as stream:
        for number, raw in numbered_lines(stream, spec.max_line_bytes):
            num_lines = number
            try:
                parse_line(raw, spec)
            except ValueError as error:
                bad.append(BadLine(number, str(error)))
    return Scan(num_lines, bad)


def describe_bad_lines(name: str, bad: list[BadLine], limit: int = 10) -> str:
    """A readable list of the first `limit` bad lines, one per line, as ``file:line: reason``."""
    shown = [f"  {name}:{b.line}: {b.reason}" for b in bad[:limit]]
    if len(bad) > limit:
        shown.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(shown)


def bad_lines_error(name: str, bad: list[BadLine]) -> UserError:
    """The UserError for `bad` (at least one) lines of input `name`: the first, the count, the fix and a list."""
    first = bad[0]
    return UserError(
        f"{name}:{first.line}: {first.reason}; {len(bad)} bad line(s) in total, nothing was encoded from them. Fix "
        f"them, or pass --skip-bad-lines to skip them (they are listed in the output's manifest).\n"
        + describe_bad_lines(name, bad))


