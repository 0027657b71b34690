"""Reading training data: plain text (one sentence or document per line) or JSONL, with line-numbered errors.

Lines are read by the reader every command shares (`llm2vec_fast.lines.record_lines`): UTF-8, a line ends at
"\n", "\r\n" or a lone "\r", a byte-order mark is dropped, lines of more than 1 MiB are refused, and blank lines are
skipped (they separate documents in plain text and carry no text); see that module for the rule and why encode
differs on blank lines. A JSON line nested too deeply to parse, a text field that is not a string, and a string
holding a lone surrogate (an escaped "\\ud800" without its pair: not text, and no tokenizer takes it) are refused
with the file and line, when the data is read: before the model loads.
"""

from __future__ import annotations

import json
import os
import re

from ..lines import LineError, json_kind, parse_json_object, record_lines


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


# Python's json decodes an escaped lone surrogate ("\\ud800") into a str that no UTF-8 encoder or tokenizer takes.
_SURROGATE = re.compile("[\ud800-\udfff]")
# The fields of a supervised example, and the optional ones' value when absent or null.
SUPERVISED_REQUIRED = ("query", "positive")
SUPERVISED_OPTIONAL = {"negative": [], "instruction": "", "dataset": ""}


def read_texts(path: str, text_field: str = "text", max_chars: int | None = None) -> list[str]:
    """Non-empty texts of a .txt (one per line) or .jsonl (`text_field` per object) file, in file order."""
    texts = []
    for number, value in _records(path, text_field):
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is {type(value).__name__}, expected a string")
        if not value.strip():
            raise DataError(f"{path}:{number}: empty text (remove the line)")
        _check_text(path, number, text_field, value)
        if max_chars is not None and len(value) > max_chars:
            raise DataError(f"{path}:{number}: text of {len(value)} characters exceeds the limit of {max_chars}")
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: no texts found (the file is empty)")
    return texts


def read_jsonl(path: str, required: tuple[str, ...]) -> list[dict]:
    """Objects of a JSONL file, each checked for the `required` string fields."""
    return [obj for _, obj in _jsonl_objects(path, required)]


def read_supervised(path: str) -> list[dict]:
    """The examples of a supervised JSONL file, each {"query", "positive": str, "negative": [str, ...],
    "instruction": str, "dataset": str}. A field of the wrong type or holding no text is a DataError naming the
    file, the line and the fix. Optional fields that are absent or null get their default (no negatives, no
    instruction, the unnamed dataset); a single negative string is a list of one."""
    examples = []
    for number, row in _jsonl_objects(path, SUPERVISED_REQUIRED):
        example = {key: row[key] for key in SUPERVISED_REQUIRED}
        for key, default in SUPERVISED_OPTIONAL.items():
            example[key] = default if row.get(key) is None else row[key]
        negatives = example["negative"]
        negatives = [negatives] if isinstance(negatives, str) else negatives
        if not isinstance(negatives, list) or not all(isinstance(n, str) and n.strip() for n in negatives):
            raise DataError(f"{path}:{number}: field 'negative' is {_shown(example['negative'])}; it must be a "
                            f"string or a list of non-empty strings (or left out)")
        for negative in negatives:
            _check_text(path, number, "negative", negative)
        example["negative"] = negatives
        for key, example_value in (("instruction", "find the passage that answers the question:"),
                                   ("dataset", "msmarco")):
            if not isinstance(example[key], str):
                raise DataError(f"{path}:{number}: field {key!r} is {_shown(example[key])}; it must be a string "
                                f"such as {example_value!r} (or left out)")
            _check_text(path, number, key, example[key])
        examples.append(example)
    return examples


def _jsonl_objects(path: str, required: tuple[str, ...]):
    """(line number, object) of every record of a JSONL file, each checked for the `required` string fields."""
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: expected a .jsonl file with fields {list(required)}")
    found = False
    for number, obj in _records(path, None):
        missing = [k for k in required if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DataError(f"{path}:{number}: missing or empty field(s) {missing}")
        for key in required:
            _check_text(path, number, key, obj[key])
        found = True
        yield number, obj
    if not found:
        raise DataError(f"{path}: no examples found (the file is empty)")


def _shown(value) -> str:
    """A JSON value's kind, with the value itself when it is short ("a number (5)")."""
    text = json_kind(value)
    return f"{text} ({json.dumps(value)})" if isinstance(value, (bool, int, float)) else text


def _check_text(path: str, number: int, field: str, value: str) -> None:
    found = _SURROGATE.search(value)
    if found:
        raise DataError(f"{path}:{number}: field {field!r} holds a lone surrogate (\\u{ord(found.group()):04x} at "
                        f"character {found.start() + 1}), which is not text: an escaped UTF-16 half without its pair. "
                        f"Fix the escape (or remove the line).")


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
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply to read; a training record is one flat "
                                f"object of fields. Fix or remove the line.") from None
            if field is None:
                yield number, obj
            elif field not in obj:
                raise DataError(f"{path}:{number}: missing field {field!r}")
            else:
                yield number, obj[field]
    except LineError as error:
        raise DataError(str(error)) from None
