"""Validation and normalisation of what users pass to `encode`.

Accepted (the llm2vec reference's forms): a bare string; a list of strings; a list of ``[instruction, text]``
or ``[instruction, text, int]`` (the int, a MEDI dataset id, is ignored); and, for compatibility, one bare
``[instruction, text, int]`` triple. Anything else is rejected with an error that names the offending position.
"""

from __future__ import annotations

from collections.abc import Sequence

# A Python str can hold lone UTF-16 surrogates (from a bad decode, JSON "\\ud800", errors="surrogateescape");
# they are not Unicode text and the tokenizer fails on them deep inside its Rust code. Files are checked for them
# when they are read (lines.surrogate_problem), so that a file's message names its line.
from .lines import LONE_SURROGATE as _SURROGATE


def normalize_inputs(sentences) -> list[tuple[str, str]]:
    """Return ``[(instruction, text), ...]`` in input order, or raise TypeError/ValueError naming the problem."""
    if sentences is None:
        raise TypeError("encode() got None: pass a string, a list of strings, or a list of [instruction, text] pairs.")
    if isinstance(sentences, str):
        sentences = [sentences]  # one text; checked like any other
    elif isinstance(sentences, (bytes, bytearray)):
        raise TypeError("encode() got bytes: decode them to str first (e.g. data.decode('utf-8')).")
    if not isinstance(sentences, Sequence) and not _is_iterable_collection(sentences):
        raise TypeError(
            f"encode() got {type(sentences).__name__}: pass a string, a list of strings, "
            f"or a list of [instruction, text] pairs."
        )
    sentences = list(sentences)
    # The reference treats a lone [instruction, text, int] (MTEB's MEDI form) as one example.
    if len(sentences) == 3 and isinstance(sentences[0], str) and isinstance(sentences[1], str) \
            and isinstance(sentences[2], int) and not isinstance(sentences[2], bool):
        sentences = [sentences]
    pairs = [_normalize_one(item, index) for index, item in enumerate(sentences)]
    for index, pair in enumerate(pairs):
        _check_unicode(pair, index)
    return pairs


def _check_unicode(pair: tuple[str, str], index: int) -> None:
    for part, string in zip(("instruction", "text"), pair):
        found = _SURROGATE.search(string)
        if found:
            raise ValueError(
                f"input {index}: its {part} holds a lone surrogate (U+{ord(found.group()):04X}) at character "
                f"{found.start()}, which is not valid Unicode and cannot be tokenized. Fix how the text was "
                f"decoded, or replace such characters (e.g. s.encode('utf-8', 'replace').decode('utf-8')).")


def _is_iterable_collection(value) -> bool:
    return hasattr(value, "__iter__") and not isinstance(value, (dict, str, bytes))


def _normalize_one(item, index: int) -> tuple[str, str]:
    if isinstance(item, str):
        return "", item
    if item is None:
        raise TypeError(f"input {index} is None: every input must be a string or an [instruction, text] pair.")
    if isinstance(item, (list, tuple)):
        if len(item) in (2, 3) and all(isinstance(part, str) for part in item[:2]):
            if len(item) == 3 and (not isinstance(item[2], int) or isinstance(item[2], bool)):
                raise ValueError(
                    f"input {index} is a triple whose third element is {type(item[2]).__name__}; the reference "
                    f"form is [instruction, text, int]."
                )
            return item[0], item[1]
        kinds = ", ".join(type(part).__name__ for part in item)
        raise ValueError(
            f"input {index} is a list of {len(item)} elements ({kinds}); expected [instruction, text] or "
            f"[instruction, text, int] with strings for instruction and text."
        )
    raise TypeError(
        f"input {index} is {type(item).__name__} ({item!r:.40}); every input must be a string or an "
        f"[instruction, text] pair. Convert numbers to str explicitly if you mean to embed them."
    )
