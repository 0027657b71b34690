"""Turning (instruction, text) pairs into token rows with the range of tokens to pool.

One batched tokenizer call with character offsets finds, for every row, where the instruction ends and the text
begins (the reference tokenizes every text a second time to count its tokens). The text keeps priority over the
instruction when a row is too long, so pooling always covers text tokens; every truncation is reported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .prompts import apply_template, join_instruction, split_separator


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
    empty_text: int = 0

    def warn(self, max_length: int, doc_max_length: int) -> None:
        if self.doc_shortened:
            warnings.warn(
                f"{self.doc_shortened} text(s) were longer than doc_max_length={doc_max_length} tokens and were "
                f"shortened to a proportional number of words (the llm2vec reference's rule); raise "
                f"doc_max_length to keep more.", stacklevel=3)
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

    def prepare(self, instruction: str, text: str) -> str:
        """The reference's prepared string (joined with the separator, wrapped in the model's template)."""
        return apply_template(join_instruction(instruction, text), self.name_or_path, self.model_type,
                              self.pooling_mode)

    def tokenize_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[TokenizedRow], TokenizationReport]:
        report = TokenizationReport()
        encoded = self._encode([self.prepare(i, t) for i, t in pairs])
        # Texts over doc_max_length are shortened by words, as the reference does, and re-tokenized (rare).
        long_rows = [k for k, (_, (start, end)) in enumerate(encoded) if end - start > self.doc_max_length]
        if long_rows:
            report.doc_shortened = len(long_rows)
            redone = self._encode([self.prepare(pairs[k][0], self._shorten_text(pairs[k][1])) for k in long_rows])
            for k, item in zip(long_rows, redone):
                encoded[k] = item
        rows = [self._fit(ids, span, report) for ids, span in encoded]
        report.empty_text = sum(1 for row in rows if row.text_end == row.text_start)
        return rows, report

    def _count_text_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False, truncation=True,
                                  max_length=self.max_length)["input_ids"])

    def _shorten_text(self, text: str) -> str:
        count = self._count_text_tokens(text)
        while count > self.doc_max_length:
            words = text.split()
            text = " ".join(words[: int(len(words) * self.doc_max_length / count)])
            count = self._count_text_tokens(text)
        return text

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
