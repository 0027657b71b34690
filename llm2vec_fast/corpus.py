"""Reading line files: the one line reader of encode corpora, training data and eval pair files.

Inputs of encode: a text file (one text per line), a JSON-lines file (an object per line with a text field and an
optional instruction field), or stdin in either format. Lines are numbered from 1, as editors number them. The input
is read as bytes in bounded chunks and split on b"\\n", b"\\r\\n" and a lone b"\\r" (old Mac files), as editors do;
not on \\x0b, \\x1c, \\u2028 and the other breaks of `str.splitlines`, which editors do not show as new lines and
which would shift every later line number. A line longer than `InputSpec.max_line_bytes` is not kept in memory,
only its size: it is a bad line (a 30 MB line would otherwise take gigabytes to tokenize).

The same rules hold for every file llm2vec-fast reads line by line (encode's corpus, `train`'s texts and JSONL
examples, `eval similarity`'s pair files, `eval probe`'s CoNLL files): they all read through `numbered_lines` and
`decode_line` (files: `text_lines`), and JSONL lines through `parse_json_object`. So everywhere:
- a line ends at \\n, \\r\\n or \\r; a UTF-8 byte-order mark before the first line is dropped;
- a line that is not UTF-8, longer than the limit, or not a JSON object (JSONL) is an error reported as
  ``file:line: reason``, the reason naming the fix;
- blank lines (empty or whitespace only) at the very end of a file are not part of it (editors leave them behind).

A blank line inside a file holds no record, and the readers differ on purpose in what that means:
- encode: a bad line (refused, or skipped and listed in the manifest with --skip-bad-lines). Encode promises one
  embedding per input line; a blank inside a corpus is a record that lost its text (an exported empty field), and
  encoding around it in silence would hand back one row fewer than the user has texts.
- train and eval similarity: skipped (`record_lines`). A blank line carries no text to lose: plain-text training
  corpora (wikitext and the like) separate paragraphs with blank lines, and pair files often separate sections.
- eval probe: a sentence boundary, as the CoNLL format defines.

Shard k holds input lines k*S+1 .. (k+1)*S (S = the shard size). Shards are defined by line numbers, not by the
valid lines before them, so a shard's content never depends on which rank reads it or on earlier bad lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import UserError
from .fingerprint import file_sha256

FORMATS = ("txt", "jsonl")
_FORMAT_OF_EXTENSION = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# Longer lines are bad lines. 1 MiB of text is far more than any model reads (the text is truncated to
# max_length tokens) and tokenizing it takes about 200 MB.
MAX_LINE_BYTES = 1 << 20
READ_BYTES = 1 << 16
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
STDIN = "-"


@dataclass(frozen=True)
class InputSpec:
    """Where the corpus is and how to read one line of it.

    path: a file, or "-" for stdin. format: "txt" or "jsonl".
    text_field, instruction_field: the JSON keys of a jsonl line.
    instruction: used for every line that has no instruction of its own ("" = none).
    max_line_bytes: a longer line is a bad line, and is never held in memory.
    """

    path: str
    format: str
    text_field: str = "text"
    instruction_field: str = "instruction"
    instruction: str = ""
    max_line_bytes: int = MAX_LINE_BYTES

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


@dataclass(frozen=True)
class OverlongLine:
    """Stands for a line longer than the limit: only its size in bytes is kept."""

    size: int
    limit: int

    def digest_bytes(self) -> bytes:
        """The bytes that stand for this line in its shard's sha256: a marker and the line's size."""
        # What a shard's hash covers in place of the line's content, which was never kept.
        return f"\0overlong line of {self.size} bytes".encode()


@dataclass
class RawShard:
    """The raw lines of one shard. lines: (line number, bytes without the line ending, or an OverlongLine);
    sha256: of those lines."""

    index: int
    lines: list[tuple[int, bytes]] = field(default_factory=list)
    sha256: str = ""


@dataclass
class ParsedShard:
    """One shard's valid lines, in input order, and its bad lines."""

    index: int
    sha256: str
    line_numbers: list[int]
    pairs: list[tuple[str, str]]
    bad: list[BadLine]


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
        raise UserError(f"cannot tell the format of {path!r} from its extension; pass --format txt or --format jsonl.")
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


def split_lines(stream, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes | OverlongLine]:
    """Every line of a binary stream without its line ending (\\n, \\r\\n or \\r), read in chunks of READ_BYTES;
    a line longer than max_line_bytes comes as an OverlongLine. Memory: one chunk plus one line of at most
    max_line_bytes, whatever the input."""
    read = getattr(stream, "read1", stream.read)  # read1: a pipe's data as it arrives, not once 64 KiB are in
    line = _LineBuffer(max_line_bytes)
    after_cr = False
    while chunk := read(READ_BYTES):
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the second half of a \r\n that the previous read cut in two
        after_cr = chunk.endswith(b"\r")
        *complete, rest = _LINE_BREAK.split(chunk)
        for piece in complete:
            line.add(piece)
            yield line.take()
        line.add(rest)
    if line.size:
        yield line.take()


class _LineBuffer:
    """The line being read: its bytes while it is within the limit, afterwards only its size."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()
        self.size = 0

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size <= self.limit:
            self.data += piece
        else:
            self.data.clear()

    def take(self) -> bytes | OverlongLine:
        line = bytes(self.data) if self.size <= self.limit else OverlongLine(self.size, self.limit)
        self.data.clear()
        self.size = 0
        return line


def numbered_lines(stream, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | OverlongLine]]:
    """(line number, line without its line ending) for every line of the corpus; trailing blank lines dropped."""
    pending_blank: list[tuple[int, bytes]] = []
    for number, raw in enumerate(split_lines(stream, max_line_bytes), start=1):
        if isinstance(raw, bytes):
            if number == 1 and raw.startswith(_BOM):
                raw = raw[3:]  # a UTF-8 byte-order mark (Windows editors) is not part of the first text
            if not raw.strip():
                # Blank: a bad line if anything follows it, nothing at all if only blank lines follow it.
                pending_blank.append((number, raw))
                continue
        yield from pending_blank
        pending_blank.clear()
        yield number, raw


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


class LineError(ValueError):
    """A line of a file that cannot be read; the message is ``file:line: reason``."""


def decode_line(raw: bytes | OverlongLine, overlong_fix: str = "split or shorten it") -> str:
    """The text of one line from `numbered_lines`; raises ValueError whose message says why it cannot be read."""
    if isinstance(raw, OverlongLine):
        raise ValueError(f"line of {raw.size} bytes, longer than the limit of {raw.limit} bytes ({overlong_fix})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        character = len(raw[:error.start].decode("utf-8")) + 1
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at character {character}); convert the "
                         f"file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)") from None


def parse_json_object(line: str, expected: str = "an object") -> dict:
    """The JSON object on one JSONL line; raises ValueError naming what is wrong (`expected`: what it should be)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        # Some of json's messages end in "at" ("Unterminated string starting at"): the column completes them.
        raise ValueError(f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {_json_type(record)}, expected {expected}")
    return record


def text_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending) of every line of a UTF-8 file, blank ones included, except the
    blank lines at its end; raises LineError (``path:line: reason``) at the first line that cannot be read."""
    with open(path, "rb") as stream:
        for number, raw in numbered_lines(stream, max_line_bytes):
            try:
                yield number, decode_line(raw)
            except ValueError as error:
                raise LineError(f"{path}:{number}: {error}") from None


def record_lines(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """`text_lines` without blank lines: the lines of a file of records (training data, pair files)."""
    return ((number, line) for number, line in text_lines(path, max_line_bytes) if line.strip())


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
            raise ValueError(f"field {spec.text_field!r} is {_json_kind(text)}, expected a string")
        instruction = record.get(spec.instruction_field)
        if instruction is not None and not isinstance(instruction, str):
            raise ValueError(f"field {spec.instruction_field!r} is {_json_kind(instruction)}, expected a string")
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


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list",
               dict: "object"}


def _json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _json_kind(value) -> str:
    """The JSON type of a value with its article ("a number", "an object"; "null")."""
    kind = _json_type(value)
    return kind if kind == "null" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
