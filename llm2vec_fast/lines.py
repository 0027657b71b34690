"""The one line reader of every file llm2vec-fast reads line by line: encode corpora, training data, eval files.

Encode's corpus (encode_job/corpus.py), `train`'s texts and JSONL examples, `eval similarity`'s pair files and
`eval probe`'s CoNLL files all read through `numbered_lines` and `decode_line` (files: `text_lines`), and JSONL
lines through `parse_json_object`. So everywhere:
- the input is read as bytes in bounded chunks and split on b"\\n", b"\\r\\n" and a lone b"\\r" (old Mac files), as
  editors do; not on \\x0b, \\x1c, \\u2028 and the other breaks of `str.splitlines`, which editors do not show as
  new lines and which would shift every later line number. Lines are numbered from 1, as editors number them;
- a UTF-8 byte-order mark before the first line is dropped;
- a line longer than the limit is not kept in memory, only its size (a 30 MB line would otherwise take gigabytes
  to tokenize);
- a line that is not UTF-8, longer than the limit, or not a JSON object (JSONL) is an error reported as
  ``file:line: reason``, the reason naming the fix; so is a JSON line nested deeper than MAX_JSON_DEPTH (checked
  before it is parsed: json's parser recurses per level), and encode refuses a JSON string holding a lone
  surrogate ("\\ud800": `surrogate_problem`), which no UTF-8 file can hold but a JSON escape can;
- blank lines (empty or whitespace only) at the very end of a file are not part of it (editors leave them behind).

A blank line inside a file holds no record, and the readers differ on purpose in what that means:
- encode: a bad line (refused, or skipped and listed in the manifest with --skip-bad-lines). Encode promises one
  embedding per input line; a blank inside a corpus is a record that lost its text (an exported empty field), and
  encoding around it in silence would hand back one row fewer than the user has texts.
- train and eval similarity: skipped (`record_lines`). A blank line carries no text to lose: plain-text training
  corpora (wikitext and the like) separate paragraphs with blank lines, and pair files often separate sections.
- eval probe: a sentence boundary, as the CoNLL format defines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

# Longer lines are bad lines. 1 MiB of text is far more than any model reads (the text is truncated to
# max_length tokens) and tokenizing it takes about 200 MB.
MAX_LINE_BYTES = 1 << 20
READ_BYTES = 1 << 16
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
# Deeper lines are bad lines: no record of ours nests beyond a few levels, and json's recursive parser must stay
# well inside Python's recursion limit (1000) in every thread.
MAX_JSON_DEPTH = 100
# A Python str can hold lone UTF-16 surrogates (a JSON "\\ud800" escape, a bad decode, errors="surrogateescape");
# they are not Unicode text: they cannot be written as UTF-8 and the tokenizer fails on them.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class OverlongLine:
    """Stands for a line longer than the limit: only its size in bytes is kept."""

    size: int
    limit: int

    def digest_bytes(self) -> bytes:
        """The bytes that stand for this line in its shard's sha256: a marker and the line's size."""
        # What a shard's hash covers in place of the line's content, which was never kept.
        return f"\0overlong line of {self.size} bytes".encode()



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
    """The JSON object on one JSONL line; raises ValueError naming what is wrong (`expected`: what it should be).

    A line nested deeper than MAX_JSON_DEPTH (lists or objects) is refused before it is parsed: json's parser
    recurses once per level, and 100k levels would otherwise end in a RecursionError (or worse, in a thread with a
    small stack)."""
    depth = json_depth(line)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep, deeper than the limit of {MAX_JSON_DEPTH}; a record is "
                         f"a flat object (flatten the line, or fix the program that wrote it)")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        # Some of json's messages end in "at" ("Unterminated string starting at"): the column completes them.
        raise ValueError(f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})") from None
    except RecursionError:  # a limit below ours (a thread's small stack): still a bad line, never a traceback
        raise ValueError("JSON nested too deep to parse; a record is a flat object (flatten the line, or fix the "
                         "program that wrote it)") from None
    if not isinstance(record, dict):
        raise ValueError(f"a JSON {json_type(record)}, expected {expected}")
    return record


# A JSON string with its escapes (so an escaped quote does not end it), to take brackets inside strings out of the
# count. It has one way to match and an unterminated string runs to the end of the line, so every character is
# looked at once: no backtracking, no second scan.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(line: str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep lists and objects nest on one JSON line (0: a scalar), brackets inside strings not counted. A line
    with at most `limit` opening brackets cannot nest deeper and is not scanned: it gets their count instead.

    Linear in the line's length, in C and numpy (a 1 MiB line of brackets: milliseconds). A line whose brackets do
    not balance gets some depth here and its error from the parser."""
    opening = line.count("[") + line.count("{")
    if opening <= limit:
        return opening
    import numpy as np  # only for such a line

    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", line)).encode("ascii")
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def surrogate_problem(text: str) -> str | None:
    """Why `text` is not Unicode text (it holds a lone surrogate: where, and the fix), or None when it is."""
    found = LONE_SURROGATE.search(text)
    if found is None:
        return None
    return (f"a lone surrogate U+{ord(found.group()):04X} at character {found.start() + 1} (a JSON escape such as "
            f"\\u{ord(found.group()):04x} without its pair), which is not Unicode text and cannot be encoded; fix "
            f"the program that wrote it, or replace such escapes with real characters")


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


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string", list: "list",
               dict: "object"}


def json_type(value) -> str:
    """The JSON type name of a decoded value ("null", "number", "object", ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def json_kind(value) -> str:
    """The JSON type of a value with its article ("a number", "an object"; "null")."""
    kind = json_type(value)
    return kind if kind == "null" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
