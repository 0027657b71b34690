"""Reading corpus files: line numbering, shards, parsing and validation; the prefetching helper. No model needed."""

import io
import json

import pytest

from llm2vec_fast import lines
from llm2vec_fast.encode_job.corpus import InputSpec, parse_line, read_shards, resolve_format, scan
from llm2vec_fast.encode_job.pipeline import prefetched, token_slices
from llm2vec_fast.errors import UserError
from llm2vec_fast.lines import OverlongLine, numbered_lines


def lines_of(data: bytes, max_line_bytes: int = lines.MAX_LINE_BYTES):
    return list(numbered_lines(io.BytesIO(data), max_line_bytes))


def test_line_numbers_split_on_line_endings_only():
    # \u2028, \x0b, \x0c and \x1c split str.splitlines() but are not line breaks in a corpus file.
    data = "a\u2028b\nc\x0bd\r\ne\x0c\x1cf\rg".encode()
    assert lines_of(data) == [(1, "a\u2028b".encode()), (2, b"c\x0bd"), (3, b"e\x0c\x1cf"), (4, b"g")]


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 5, 64])
def test_cr_lf_and_crlf_break_lines_wherever_a_read_ends(monkeypatch, read_bytes):
    # Every split point of the input falls at the end of some read for one of these sizes, \r|\n included.
    monkeypatch.setattr(lines, "READ_BYTES", read_bytes)
    data = b"one\rtwo\nthree\r\nfour\r\rsix\n\r\nseven\r\n\r\n"
    assert lines_of(data) == [(1, b"one"), (2, b"two"), (3, b"three"), (4, b"four"), (5, b""), (6, b"six"),
                              (7, b""), (8, b"seven")]


def test_a_line_over_the_limit_keeps_only_its_size(monkeypatch):
    monkeypatch.setattr(lines, "READ_BYTES", 4)
    assert lines_of(b"short\r\n" + b"z" * 11 + b"\rok", max_line_bytes=10) == [
        (1, b"short"), (2, OverlongLine(11, 10)), (3, b"ok")]
    assert lines_of(b"z" * 10 + b"\n", max_line_bytes=10) == [(1, b"z" * 10)]
    with pytest.raises(ValueError, match="line of 11 bytes, longer than the limit of 10 bytes.*--max-line-bytes"):
        parse_line(OverlongLine(11, 10), InputSpec("x.txt", "txt"))


def test_trailing_blank_lines_are_dropped_but_inner_ones_kept():
    assert lines_of(b"a\n\n  \nb\n\n \n") == [(1, b"a"), (2, b""), (3, b"  "), (4, b"b")]
    assert lines_of(b"") == []
    assert lines_of(b"\xef\xbb\xbfa\n") == [(1, b"a")]


def test_shards_cover_fixed_line_ranges(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"t{i}\n" for i in range(1, 12)))
    spec = InputSpec(str(path), "txt")
    seen = []
    shards = list(read_shards(spec, 4, lambda k: k != 1, on_end=seen.append))
    assert [s.index for s in shards] == [0, 2]
    assert [n for n, _ in shards[1].lines] == [9, 10, 11]
    assert seen == [11]
    again = list(read_shards(spec, 4, lambda k: True))
    assert again[0].sha256 == shards[0].sha256 and again[2].sha256 == shards[1].sha256


@pytest.mark.parametrize("line, reason", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "a JSON list"),
    (b'{"body": "x"}', "no 'text' field"),
    (b'{"text": 3}', "field 'text' is a number"),
    (b'{"text": "  "}', "whitespace-only text"),
    (b'{"text": "x", "instruction": ["q"]}', "field 'instruction' is a list"),
    (b"", "empty line"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
])
def test_bad_jsonl_lines_say_why(line, reason):
    with pytest.raises(ValueError, match=reason):
        parse_line(line, InputSpec("x.jsonl", "jsonl"))


def test_instructions_and_custom_fields():
    spec = InputSpec("x.jsonl", "jsonl", text_field="body", instruction_field="q", instruction="default:")
    assert parse_line(json.dumps({"body": "b", "q": "own:"}).encode(), spec) == ("own:", "b")
    assert parse_line(json.dumps({"body": "b"}).encode(), spec) == ("default:", "b")
    assert parse_line(json.dumps({"body": "b", "q": None}).encode(), spec) == ("default:", "b")
    assert parse_line(json.dumps({"body": "b", "q": ""}).encode(), spec) == ("", "b")
    assert parse_line(b" padded text ", InputSpec("x.txt", "txt", instruction="i:")) == ("i:", " padded text ")


def test_scan_lists_every_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a"}\n{bad\n\n{"text": "b"}\n{"text": ""}\n\n')
    result = scan(InputSpec(str(path), "jsonl"))
    assert result.num_lines == 5
    assert [b.line for b in result.bad] == [2, 3, 5]
    assert result.valid_lines_per_shard(2) == [1, 1, 0]
    assert result.valid_lines_per_shard(10) == [2]


def test_format_from_extension():
    assert resolve_format("a.JSONL", "auto") == "jsonl"
    assert resolve_format("a.txt", "auto") == "txt"
    assert resolve_format("-", "auto") == "txt"
    assert resolve_format("a.csv", "txt") == "txt"
    with pytest.raises(UserError, match="--format"):
        resolve_format("a.csv", "auto")


def test_prefetched_keeps_order_and_reraises():
    assert list(prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise UserError("boom")

    items = prefetched(failing())
    assert next(items) == 1
    with pytest.raises(UserError, match="boom"):
        next(items)


def test_token_slices_cover_every_row_once():
    assert token_slices([5, 5, 5, 20, 1], 10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert token_slices([], 10) == []
