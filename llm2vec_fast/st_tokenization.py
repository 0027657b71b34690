"""Tokenizing inputs the way a sentence-transformers Transformer module does (for encoders loaded from a
sentence-transformers directory).

sentence-transformers prepends the prompt to the text as one string, tokenizes it with the tokenizer's own special
tokens, and truncates to max_seq_length keeping those special tokens (a trailing EOS survives truncation). With
`include_prompt: false` its Pooling skips the first `prompt_length` positions of each row, prompt_length being the
token count of the prompt tokenized alone minus a trailing special token; that count, not the joint tokenization's
boundary, decides what is pooled, so we use the same count. No LLM2Vec word-based doc_max_length shortening, no
separator, no template.
"""

from __future__ import annotations

import warnings

from .tokenization import TokenizationReport, TokenizedRow, character_limit


class PromptTokenizer:
    """Rows of (prompt, text) pairs as sentence-transformers tokenizes them.

    TokenizedRow.text_start is where pooling starts when the prompt is excluded (prompt_length, or 0 without a
    prompt); text_end is the row's end, since sentence-transformers pools every token after the prompt (a trailing
    EOS included)."""

    def __init__(self, tokenizer, max_length: int, exclude_prompt: bool = False):
        self.tokenizer = tokenizer
        self.exclude_prompt = exclude_prompt  # include_prompt: false (only what the warnings say depends on it)
        self.max_length = max_length
        self.filler_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        special = set(tokenizer.all_special_ids)
        # The special tokens the tokenizer adds around a text (BOS before, EOS after); truncation keeps them.
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.lead = next((i for i, t in enumerate(probe) if t not in special), len(probe))
        self.trail = len(probe) - 1 - max((i for i, t in enumerate(probe) if t not in special), default=-1)
        self.special_ids = special
        self.character_limit = character_limit(tokenizer, max_length)
        self._prompt_lengths: dict[str, int] = {}

    def prompt_length(self, prompt: str) -> int:
        """sentence-transformers' prompt length: the prompt tokenized alone (special tokens included, truncated
        to max_length), minus one when its last token is a special token."""
        if prompt not in self._prompt_lengths:
            ids = self._truncated(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            self._prompt_lengths[prompt] = len(ids) - (1 if ids and ids[-1] in self.special_ids else 0)
        return self._prompt_lengths[prompt]

    def tokenize_pairs(self, pairs: list[tuple[str, str]], *, whole: bool = False
                       ) -> tuple[list[TokenizedRow], TokenizationReport]:
        """Rows of (prompt, text) pairs ("" for no prompt), and what truncation cut. whole: keep every token
        (long_input="chunk"; rows may be longer than max_length)."""
        report = TokenizationReport()
        strings = []
        for prompt, text in pairs:
            joined = prompt + text
            # Far more characters than max_length tokens can hold: the tokens kept are the same.
            if not whole and len(joined) > self.character_limit:
                joined = joined[: self.character_limit]
                report.characters_cut += 1
            strings.append(joined)
        encoded = self.tokenizer(strings, add_special_tokens=True, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"] if strings else []
        rows, swallowed = [], 0
        for (prompt, _), ids in zip(pairs, encoded):
            if not whole and len(ids) > self.max_length:
                report.truncated += 1
                ids = self._truncated(ids)
            if not ids:
                rows.append(TokenizedRow([self.filler_id], 0, 0))
                continue
            start = min(self.prompt_length(prompt), len(ids)) if prompt else 0
            swallowed += start == len(ids)
            rows.append(TokenizedRow(list(ids), start, len(ids)))
        if swallowed and self.exclude_prompt:
            warnings.warn(
                f"{swallowed} input(s) have no token after their prompt (an empty text, a text the prompt's last "
                f"token absorbed, or one truncated away): with include_prompt false their pooled vector is zero, as "
                f"in sentence-transformers.", stacklevel=3)
        return rows, report

    def _truncated(self, ids: list[int]) -> list[int]:
        """The tokenizer's own truncation to max_length (truncation="longest_first" on a single text): the content
        is cut at its end, the added special tokens are kept."""
        if len(ids) <= self.max_length:
            return list(ids)
        lead, trail = self.lead, self.trail
        keep = max(self.max_length - lead - trail, 0)
        return list(ids[:lead]) + list(ids[lead: lead + keep]) + (list(ids[len(ids) - trail:]) if trail else [])
