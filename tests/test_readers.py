"""One line reader for encode, train and eval (llm2vec_fast/lines.py): the same file read by each of them gives the
same texts and the same ``file:line: reason`` errors; blank lines inside a file are the one documented difference
(a bad line for encode, skipped by train and eval). No model needed."""

import json

import pytest

from llm2vec_fast.encode_job.corpus import InputSpec, parse_shard, read_shards, scan
from llm2vec_fast.evaluation.probe import ConllDataError, read_conll
from llm2vec_fast.evaluation.similarity import PairsDataError, read_pairs
from llm2vec_fast.lines import MAX_LINE_BYTES
from llm2vec_fast.train.data import DataError, read_texts

TEXTS = ["the cat sat", "a red car", "caf\u00e9 au lait", "sun and moon"]


def jsonl_line(i: int, text: str) -> bytes:
    """A line every reader accepts: encode and train read "text", eval similarity the pair and its score."""
    return json.dumps({"text": text, "sentence1": text, "sentence2": text[::-1], "score": i}).encode()


def tsv_line(i: int, text: str) -> bytes:
    """A line of a .txt file: encode and train read it whole, eval similarity as sentence1, sentence2, score."""
    return f"{text}\t{text[::-1]}\t{i}".encode()


def encode_read(path: str, fmt: str) -> tuple[list[str], str | None]:
    """(texts, first error as ``file:line: reason``) as `llm2vec-fast encode` reads the file."""
    spec = InputSpec(path, fmt)
    bad = scan(spec).bad
    if bad:
        return [], f"{path}:{bad[0].line}: {bad[0].reason}"
    texts = [text for raw in read_shards(spec, 1000, lambda k: True) for _, text in parse_shard(raw, spec).pairs]
    return texts, None


def train_read(path: str) -> tuple[list[str], str | None]:
    try:
        return read_texts(path), None
    except DataError as error:
        return [], str(error)


def eval_read(path: str, fmt: str) -> tuple[list[str], str | None]:
    """(texts, error) as `eval similarity` reads the file; for a .txt file the texts are whole lines, as the other
    readers see them."""
    try:
        pairs = read_pairs(path)
    except PairsDataError as error:
        return [], str(error)
    if fmt == "jsonl":
        return pairs.sentences1, None
    return [f"{a}\t{b}\t{score:g}" for a, b, score in zip(pairs.sentences1, pairs.sentences2, pairs.scores)], None


def build(make_line, lines: list, separator: bytes = b"\n", prefix: bytes = b"", suffix: bytes = b"\n") -> bytes:
    """A file of `lines`: an int i is the i-th text as a valid line, bytes are taken as they are."""
    body = [make_line(item, TEXTS[item]) if isinstance(item, int) else item for item in lines]
    return prefix + separator.join(body) + suffix


# id -> (lines, separator, prefix, suffix, expected texts or None, expected error "line: reason" or None)
CASES = {
    "LF": ([0, 1, 2, 3], b"\n", b"", b"\n", TEXTS, None),
    "CR": ([0, 1, 2, 3], b"\r", b"", b"\r", TEXTS, None),
    "CRLF": ([0, 1, 2, 3], b"\r\n", b"", b"\r\n", TEXTS, None),
    "mixed-endings-no-final-newline": ([0, 1, 2, 3], b"\r\n", b"", b"", TEXTS, None),
    "BOM": ([0, 1, 2, 3], b"\n", b"\xef\xbb\xbf", b"\n", TEXTS, None),
    "trailing-blank-lines": ([0, 1, 2, 3], b"\n", b"", b"\n\n  \r\n\n", TEXTS, None),
    "invalid-UTF-8": ([0, b"caf\xe9 au lait", 2, 3], b"\n", b"", b"\n", None,
                      "2: not valid UTF-8 (byte 0xe9 at character 4); convert the file to UTF-8"),
    "overlong-line": ([0, b"x" * (MAX_LINE_BYTES + 1), 2, 3], b"\n", b"", b"\n", None,
                      f"2: line of {MAX_LINE_BYTES + 1} bytes, longer than the limit of {MAX_LINE_BYTES} bytes "
                      f"(split or shorten it"),
}
JSONL_CASES = {
    "invalid-JSON": ([0, 1, b'{"text": "broken', 3], b"\n", b"", b"\n", None,
                     "3: invalid JSON (Unterminated string starting at column 10)"),
    "not-an-object": ([0, b"[1, 2]", 2, 3], b"\n", b"", b"\n", None, "2: a JSON list, expected an object"),
}


@pytest.mark.parametrize("case, fmt", [(case, fmt) for case in CASES for fmt in ("txt", "jsonl")]
                         + [(case, "jsonl") for case in JSONL_CASES])
def test_every_reader_reads_a_file_alike(tmp_path, fmt, case):
    lines, separator, prefix, suffix, texts, error = {**CASES, **JSONL_CASES}[case]
    path = tmp_path / f"data.{fmt}"
    make_line = jsonl_line if fmt == "jsonl" else tsv_line
    path.write_bytes(build(make_line, lines, separator, prefix, suffix))
    if texts is not None and fmt == "txt":
        texts = [tsv_line(i, t).decode() for i, t in enumerate(texts)]
    results = {"encode": encode_read(str(path), fmt), "train": train_read(str(path)),
               "eval": eval_read(str(path), fmt)}
    for reader, (got_texts, got_error) in results.items():
        if error is None:
            assert (got_texts, got_error) == (texts, None), reader
        else:
            # The reason's head is shared; what follows "expected" may name the reader's own fields.
            assert got_error is not None and got_error.startswith(f"{path}:{error}"), (reader, got_error)


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_a_blank_line_inside_is_bad_for_encode_and_skipped_by_train_and_eval(tmp_path, fmt):
    """The one difference, on purpose (see lines.py): encode promises an embedding per input line."""
    make_line = jsonl_line if fmt == "jsonl" else tsv_line
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(build(make_line, [0, 1, b"", 2, b"  \t", 3]))
    expected = TEXTS if fmt == "jsonl" else [tsv_line(i, t).decode() for i, t in enumerate(TEXTS)]
    assert train_read(str(path)) == (expected, None)
    assert eval_read(str(path), fmt) == (expected, None)
    bad = scan(InputSpec(str(path), fmt)).bad
    assert [b.line for b in bad] == [3, 5]
    assert all(("empty" in b.reason or "whitespace-only" in b.reason) for b in bad)


def test_conll_reader_shares_line_endings_bom_and_utf8_errors(tmp_path):
    path = tmp_path / "a.conll"
    path.write_bytes(b"\xef\xbb\xbfEU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\rPeter NNP B-NP B-PER\r\n\r\n")
    sentences = read_conll(str(path), 3)
    assert [s.words for s in sentences] == [["EU", "rejects"], ["Peter"]]
    path.write_bytes(b"EU NNP B-NP B-ORG\ncaf\xe9 NN B-NP O\n")
    with pytest.raises(ConllDataError, match=r"a.conll:2: not valid UTF-8 \(byte 0xe9 at character 4\)"):
        read_conll(str(path), 3)
