"""Reading training data: plain text (one sentence or document per line) or JSONL, with line-numbered errors.

Lines are read by the reader every command shares (`llm2vec_fast.lines.record_lines`): UTF-8, a line ends at
"\n", "\r\n" or a lone "\r", a byte-order mark is dropped, lines of more than 1 MiB are refused, and blank lines are
skipped (they separate documents in plain text and carry no text); see that module for the rule and why encode
differs on blank lines.
"""

from __future__ import annotations

import os

from ..lines import LineError, parse_json_object, record_lines


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def read_texts(path: str, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """Non-empty texts of a .txt (one per line) or .jsonl (`text_field` per object) file, in file order."""
    texts = []
    for number, value in _records(path, text_field):
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            raise DataError(f"{path}:{number}: empty text (remove the line)")
        if max_chars is not None and len(value) > max_chars:
            raise DataError(f"{path}:{number}: text of {len(value)} characters exceeds the limit of {max_chars}")
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: no texts found (the file is empty)")
    return texts


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    """Objects of a JSONL file, each checked for the `required` string fields."""
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: expected a .jsonl file with fields {list(required)}")
    rows = []
    for number, obj in _records(path, None):
        missing = [k for k in required if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DataError(f"{path}:{number}: missing or empty field(s) {missing}")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no examples found (the file is empty)")
    return rows


def _records(path: str, field: str | None):
    """(line number, record) of every non-blank line: the line itself (.txt), else its JSON object, or the object's
    `field` when one is given."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    jsonl = path.endswith(".jsonl")
    try:
        for number, line in record_lines(path):
            if not jsonl:
                yield number, line
                continue
            try:
                obj = parse_json_object(line)
            except ValueError as error:
                raise DataError(f"{path}:{number}: {error}") from None
            if field is None:
                yield number, obj
            elif field not in obj:
                raise DataError(f"{path}:{number}: missing field {field!r}")
            else:
                yield number, obj[field]
    except LineError as error:
        raise DataError(str(error)) from None
