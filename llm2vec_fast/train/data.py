"""Reading training data: plain text (one sentence or document per line) or JSONL, with line-numbered errors.

Files are UTF-8; a line ends at "\n", "\r\n" or a lone "\r" alike.
"""

from __future__ import annotations

import json
import os
import re

# Bytes that are not UTF-8 decode, under errors="surrogateescape", to these code points and to nothing else.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


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
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    jsonl = path.endswith(".jsonl")
    # newline=None (universal newlines) turns "\r\n" and a lone "\r" into "\n" before lines are split.
    with open(path, encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            _check_utf8(path, number, line)
            if jsonl:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: invalid JSON ({error.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object")
                if field is None:
                    yield number, obj
                elif field not in obj:
                    raise DataError(f"{path}:{number}: missing field {field!r}")
                else:
                    yield number, obj[field]
            else:
                if not line.strip():
                    continue  # blank lines separate documents in plain text; they carry no text
                yield number, line


def _check_utf8(path: str, number: int, line: str) -> None:
    bad = _UNDECODABLE.search(line)
    if bad:
        byte = ord(bad.group()) - 0xDC00
        raise DataError(f"{path}:{number}: not valid UTF-8 (byte 0x{byte:02x} at character {bad.start() + 1}); "
                        f"convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")
