"""Turning (instruction, text) pairs into token rows with the range of tokens to pool.

One batched tokenizer call with character offsets finds, for every row, where the instruction ends and the text
begins (the reference tokenizes every text a second time to count its tokens). The text keeps priority over the
instruction when a row is too long, so pooling always covers text tokens; every truncation is reported.
A text over doc_max_length is shortened by the reference's word rule unless that would (nearly) empty it, in
which case its first doc_max_length tokens are kept; only the first `character_limit` characters of an
instruction or text are ever handed to the tokenizer.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from itertools import islice

from .prompts import apply_template, join_instruction, split_separator

# The words of the reference's shortening rule, str.split()'s (re's \s is the same Unicode whitespace test), found
# lazily so that a huge text is never materialised as a list of millions of strings.
_WORD = re.compile(r"\S+")
# Safety factor on the character bound of `character_limit`: the tokens just before a cut may differ from those of
# the whole text (a word or BPE merge straddling the cut), so the kept tokens must end far before it.
_CHARACTER_LIMIT_MARGIN = 4
# For a tokenizer that cannot list its vocabulary: longer than the tokens of the tokenizers we know.
_FALLBACK_LONGEST_TOKEN = 256


@dataclass(frozen=True)
class TokenizedRow:
    """One input as the model sees it.

    input_ids: the row's token ids (no padding).
    text_start, text_end: the text's tokens, ``input_ids[text_start:text_end]`` (instruction and BOS excluded).
    """

    input_ids: list[int]
    text_start: int
    text_end: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizationReport:
    """What happened to a batch of inputs that the user must hear about."""

    truncated: int = 0
    instruction_cut: int = 0
    doc_shortened: int = 0
    doc_token_cut: int = 0
    empty_text: int = 0
    characters_cut: int = 0

    def warn(self, max_length: int, doc_max_length: int) -> None:
        """Warn once for each kind of change counted here, saying how to avoid it.

        max_length, doc_max_length: the encoder's limits, which the messages name.
        """
        if self.characters_cut:
            warnings.warn(
                f"{self.characters_cut} input(s) had an instruction or text so long that only its first characters "
                f"were tokenized (far more than max_length={max_length} tokens can hold, so the tokens kept are "
                f"the same); split such documents to embed all of them.", stacklevel=3)
        if self.doc_shortened:
            warnings.warn(
                f"{self.doc_shortened} text(s) were longer than doc_max_length={doc_max_length} tokens and were "
                f"shortened to a proportional number of words (the llm2vec reference's rule); raise "
                f"doc_max_length to keep more.", stacklevel=3)
        if self.doc_token_cut:
            warnings.warn(
                f"{self.doc_token_cut} text(s) were longer than doc_max_length={doc_max_length} tokens and have too "
                f"few spaces to be shortened by whole words (e.g. Chinese, Japanese, URLs, base64): they were cut "
                f"to their first {doc_max_length} tokens instead; raise doc_max_length to keep more.", stacklevel=3)
        if self.truncated:
            extra = (f" ({self.instruction_cut} of them had their instruction shortened so the text keeps most of "
                     f"the room)") if self.instruction_cut else ""
            warnings.warn(
                f"{self.truncated} input(s) were longer than max_length={max_length} tokens and were truncated"
                f"{extra}; raise max_length to keep them whole.", stacklevel=3)
        if self.empty_text:
            warnings.warn(
                f"{self.empty_text} input(s) have an empty text: their embedding pools the tokens the model saw "
                f"for them (BOS and instruction) instead.", stacklevel=3)


class RowTokenizer:
    """Prepares and tokenizes inputs for one encoder configuration."""

    def __init__(self, tokenizer, *, max_length: int, doc_max_length: int, pooling_mode: str,
                 name_or_path: str = "", model_type: str = ""):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.pooling_mode = pooling_mode
        self.name_or_path = name_or_path
        self.model_type = model_type
        self.filler_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        self.appends_eos = tokenizer.eos_token_id is not None and len(probe) > 1 and probe[-1] == tokenizer.eos_token_id
        self.character_limit = character_limit(tokenizer, max_length)

    def prepare(self, instruction: str, text: str) -> str:
        """The reference's prepared string (joined with the separator, wrapped in the model's template)."""
        return apply_template(join_instruction(instruction, text), self.name_or_path, self.model_type,
                              self.pooling_mode)

    def tokenize_pairs(self, pairs: list[tuple[str, str]], *, whole: bool = False
                       ) -> tuple[list[TokenizedRow], TokenizationReport]:
        """Rows of (instruction, text) pairs, and what had to be cut to fit the limits.

        whole: keep every token (long_input="chunk"): no character bound, no doc_max_length shortening and no
        max_length cut, so a row may be longer than max_length (chunking.split_windows cuts it into windows). A
        row that the limits leave whole (text within doc_max_length, row within max_length) is the same either way.
        """
        report = TokenizationReport()
        if whole:
            rows = [TokenizedRow(ids, *span) if ids else TokenizedRow([self.filler_id], 0, 0)
                    for ids, span in self._encode([self.prepare(i, t) for i, t in pairs])]
            report.empty_text = sum(1 for row in rows if row.text_end == row.text_start)
            return rows, report
        bounded = [self._bound_characters(pair, report) for pair in pairs]
        encoded = self._encode([self.prepare(i, t) for i, t in bounded])
        # Texts over doc_max_length are shortened by words, as the reference does, and re-tokenized (rare); a
        # text the word rule would (nearly) wipe out keeps its first doc_max_length tokens instead.
        long_rows = [k for k, (_, (start, end)) in enumerate(encoded) if end - start > self.doc_max_length]
        shortened = {k: self._shorten_by_words(pairs[k][1]) for k in long_rows}
        by_words = [k for k in long_rows if shortened[k] is not None]
        redone = self._encode([self.prepare(bounded[k][0], shortened[k]) for k in by_words])
        for k, item in zip(by_words, redone):
            encoded[k] = item
        for k in long_rows:
            if shortened[k] is None:
                encoded[k] = self._keep_first_text_tokens(*encoded[k])
        report.doc_shortened = len(by_words)
        report.doc_token_cut = len(long_rows) - len(by_words)
        rows = [self._fit(ids, span, report) for ids, span in encoded]
        report.empty_text = sum(1 for row in rows if row.text_end == row.text_start)
        return rows, report

    def _bound_characters(self, pair: tuple[str, str], report: TokenizationReport) -> tuple[str, str]:
        # Tokenizing a 30 MB text takes ~9 GB; its characters past `character_limit` cannot reach the kept tokens.
        instruction, text = pair
        limit = self.character_limit
        if len(instruction) <= limit and len(text) <= limit:
            return pair
        report.characters_cut += 1
        return instruction[:limit], text[:limit]

    def _count_text_tokens(self, text: str) -> int:
        """The reference's count: the text alone, no special tokens, at most max_length."""
        # min() rather than truncation=True: a fast tokenizer stores truncation settings on its shared backend
        # at each call that changes them, which concurrent encodes would race on.
        ids = self.tokenizer(text[: self.character_limit], add_special_tokens=False)["input_ids"]
        return min(len(ids), self.max_length)

    def _shorten_by_words(self, text: str) -> str | None:
        """The reference's rule: cut to a proportional number of whitespace words until at most doc_max_length
        tokens remain. None when that keeps fewer than half of doc_max_length tokens: a text with few spaces
        (CJK, a URL) would lose all or nearly all of its content, and different texts would embed alike."""
        count = self._count_text_tokens(text)
        kept = sum(1 for _ in _WORD.finditer(text))
        while count > self.doc_max_length:
            kept = int(kept * self.doc_max_length / count)
            count = self._count_text_tokens(_first_words(text, kept, self.character_limit))
        if 2 * count < self.doc_max_length:
            return None
        return _first_words(text, kept)

    def _keep_first_text_tokens(self, ids: list[int], span: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
        start, end = span
        cut = start + self.doc_max_length
        return ids[:cut] + ids[end:], (start, cut)

    def tokenize_prepared(self, prepared: list[str], report: TokenizationReport | None = None) -> list[TokenizedRow]:
        """Tokenize reference-style prepared strings (with the separator) in one batched call."""
        report = report if report is not None else TokenizationReport()
        return [self._fit(ids, span, report) for ids, span in self._encode(prepared)]

    def _encode(self, prepared: list[str]) -> list[tuple[list[int], tuple[int, int]]]:
        """Token ids and the text's token range of each prepared string, untruncated."""
        if not prepared:
            return []
        strings, text_chars = zip(*(split_separator(p) for p in prepared))
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(list(strings), add_special_tokens=True, return_offsets_mapping=True,
                                     return_attention_mask=False, return_token_type_ids=False)
            spans = [_text_span(offsets, start) for offsets, start in zip(encoded["offset_mapping"], text_chars)]
        else:
            encoded = self.tokenizer(list(strings), add_special_tokens=True, return_attention_mask=False,
                                     return_token_type_ids=False)
            spans = [self._text_span_slow(ids, s[start:]) for ids, s, start in
                     zip(encoded["input_ids"], strings, text_chars)]
        return list(zip(encoded["input_ids"], spans))

    def _text_span_slow(self, ids: list[int], text: str) -> tuple[int, int]:
        # Without offsets, do what the reference does: the text is the last n tokens (before an EOS that the
        # tokenizer itself appends), n being the text's token count alone.
        n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        end = len(ids) - 1 if self.appends_eos and ids and ids[-1] == self.tokenizer.eos_token_id else len(ids)
        return max(0, end - n), end

    def _fit(self, ids: list[int], span: tuple[int, int], report: TokenizationReport) -> TokenizedRow:
        """Apply max_length with the text's priority; return the row with its text range."""
        ids = list(ids)
        start, end = span
        if not ids:
            # A row the tokenizer left empty (no BOS, empty text) still needs one token to be encoded.
            return TokenizedRow([self.filler_id], 0, 0)
        if len(ids) <= self.max_length:
            return TokenizedRow(ids, start, end)
        report.truncated += 1
        lead = 1 if ids[0] == self.bos_id and start > 0 else 0
        instruction, text, suffix = ids[lead:start], ids[start:end], ids[end:]
        room = self.max_length - lead - len(suffix)
        if room <= 0:
            # Pathological max_length: keep the first tokens and pool over whatever text survives.
            kept = ids[: self.max_length]
            return TokenizedRow(kept, min(start, len(kept)), min(end, len(kept)))
        # The text gets what the instruction leaves, but never less than half the room.
        text_keep = min(len(text), max(room - len(instruction), room // 2))
        instruction_keep = min(len(instruction), room - text_keep)
        if instruction_keep < len(instruction):
            report.instruction_cut += 1
        kept = ids[:lead] + instruction[:instruction_keep] + text[:text_keep] + suffix
        text_start = lead + instruction_keep
        return TokenizedRow(kept, text_start, text_start + text_keep)


def character_limit(tokenizer, max_length: int) -> int:
    """Characters of an instruction or text worth tokenizing: max_length tokens never span more.

    No token decodes to more characters than its vocabulary entry has (byte-level BPE spells each byte as one
    character, SentencePiece spells its text), so max_length tokens cover at most max_length * longest characters;
    the margin keeps the cut far from the kept tokens, whose tokenization cannot depend on it. The bound assumes
    a normalizer that does not drop characters (the Llama, Mistral, Gemma and Qwen2 tokenizers keep every space;
    NFC composition merges at most a few); one that collapses whitespace or strips accents is covered only as far
    as the margin reaches.
    """
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=1)
    except (AttributeError, NotImplementedError, TypeError):
        longest = _FALLBACK_LONGEST_TOKEN
    return _CHARACTER_LIMIT_MARGIN * max_length * max(longest, 1)


def _first_words(text: str, count: int, limit: int | None = None) -> str:
    """``" ".join(text.split()[:count])``, or its first `limit` characters, without splitting all of `text`."""
    words, size = [], 0
    for match in islice(_WORD.finditer(text), count):
        if limit is not None and size > limit:
            break
        words.append(match.group())
        size += len(words[-1]) + 1
    joined = " ".join(words)
    return joined if limit is None else joined[:limit]


def _text_span(offsets: list[tuple[int, int]], text_char: int) -> tuple[int, int]:
    """Token range of the text: tokens whose character span ends after the text's first character.

    Tokenizer-added special tokens (BOS, a trailing EOS) have the empty span (0, 0) and so never count as text;
    a token that straddles the instruction/text boundary (a leading space merged into the first word) does.
    """
    inside = [i for i, (s, e) in enumerate(offsets) if e > text_char and e > s]
    if inside:
        return inside[0], inside[-1] + 1
    # Empty text: an empty range right after the last real token (or after the leading special tokens).
    real = [i for i, (s, e) in enumerate(offsets) if e > s]
    if real:
        position = real[-1] + 1
    else:
        position = 1 if offsets and tuple(offsets[0]) == (0, 0) else 0
    return position, position
