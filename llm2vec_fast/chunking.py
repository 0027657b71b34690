"""Long inputs embedded whole (``long_input="chunk"``): a text's tokens split into windows that each fit max_length,
and the windows' pooled vectors combined into the text's one.

Why windows rather than one long row: the model was trained on rows of at most max_length tokens and attention
costs grow with the square of a row's length. Each window repeats what surrounds the text in the row (BOS,
instruction, template prefix and suffix, a tokenizer-added EOS), so every window is an input of the kind the model
knows, pooled over its text tokens as any row is. The text is tokenized once; a window is a slice of that row,
built only when its batch is (`window_row`), so a 1M-token document costs its token ids and one batch of hidden
states at a time, never all of them.

The text's pooled vector is the mean of its windows' pooled vectors weighted by the number of tokens each window
pools over. With chunk_overlap > 0 a token shared by two windows counts in both (each time with its own window's
context): every window is pooled exactly as if it were encoded alone, so the result is the weighted mean of the
windows encoded one by one. With mean pooling and no overlap this is the mean over all the text's tokens. In
weighted_mean pooling each window keeps its own position weights (1..L over its L tokens).

The modes that read one token (eos_token, last_token, bos_token) are refused: that token sees only its own window,
so the embedding would silently leave the rest of the text out, which is what chunking is asked to avoid.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .choices import LONG_INPUTS
from .tokenization import TokenizedRow

# The pooling modes whose per-window vectors are means over tokens, and so combine into a mean over the text.
CHUNKABLE_POOLING = ("mean", "weighted_mean")


def check_long_input(long_input: str, chunk_overlap: int, pooling_mode: str) -> None:
    """Refuse an unknown long_input, a chunk_overlap that is not an int >= 0, or chunk with a one-token pooling
    mode (ValueError / TypeError naming the fix)."""
    if long_input not in LONG_INPUTS:
        raise ValueError(f"unknown long_input {long_input!r}; choose one of {', '.join(map(repr, LONG_INPUTS))} "
                         f"(truncate: cut long texts to max_length, chunk: embed them whole in windows).")
    if isinstance(chunk_overlap, bool) or not isinstance(chunk_overlap, numbers.Integral):
        raise TypeError(f"chunk_overlap must be an int >= 0 (tokens shared by consecutive windows), got "
                        f"{type(chunk_overlap).__name__} {chunk_overlap!r}.")
    if chunk_overlap < 0:
        raise ValueError(f"chunk_overlap must be >= 0 (tokens shared by consecutive windows), got {chunk_overlap}.")
    if long_input == "chunk" and pooling_mode not in CHUNKABLE_POOLING:
        raise ValueError(
            f"long_input='chunk' needs mean or weighted_mean pooling; {pooling_mode} pooling reads one token, which "
            f"sees only its own window, so most of a long text would be silently left out. Use "
            f"long_input='truncate' (the text is cut to max_length, with a warning) or a mean pooling mode.")


@dataclass(frozen=True)
class Window:
    """One model row of a text: text tokens [start, end) of row `row` (counted from its first text token), with
    everything around the text; `length` tokens in all. whole: the row as it is (it fits max_length)."""

    row: int
    start: int
    end: int
    length: int
    whole: bool


def split_windows(rows: list[TokenizedRow], max_length: int, overlap: int) -> list[Window]:
    """The windows of `rows` in row order: a row of at most max_length tokens is one whole window; a longer row's
    text is cut into consecutive slices of as many tokens as fit beside its fixed tokens (BOS, instruction,
    template, EOS), each starting `overlap` tokens before the previous one ended. ValueError (naming the input)
    when the fixed tokens leave no more room than `overlap`."""
    windows = []
    for k, row in enumerate(rows):
        text_length = row.text_end - row.text_start
        if len(row) <= max_length:
            windows.append(Window(k, 0, text_length, len(row), True))
            continue
        fixed = len(row) - text_length
        room = max_length - fixed
        if room <= overlap:
            raise ValueError(
                f"input {k}: its instruction, template and special tokens take {fixed} of max_length={max_length} "
                f"tokens, leaving {max(room, 0)} per window for the text, which must be more than "
                f"chunk_overlap={overlap}; shorten the instruction, raise max_length or lower chunk_overlap.")
        start = 0
        while True:
            end = min(start + room, text_length)
            windows.append(Window(k, start, end, fixed + end - start, False))
            if end == text_length:
                break
            start = end - overlap
    return windows


def whole_windows(rows: list[TokenizedRow]) -> list[Window]:
    """Every row as one whole window, whatever its length (long_input="truncate": rows are already cut)."""
    return [Window(k, 0, row.text_end - row.text_start, len(row), True) for k, row in enumerate(rows)]


def window_row(row: TokenizedRow, window: Window) -> TokenizedRow:
    """The model row of `window` of `row`: its tokens before the text, the window's text slice, its tokens after."""
    if window.whole:
        return row
    ids, start, end = row.input_ids, row.text_start, row.text_end
    sliced = ids[:start] + ids[start + window.start: start + window.end] + ids[end:]
    return TokenizedRow(sliced, start, start + window.end - window.start)


class WindowMeans:
    """Combines the pooled vectors of windows, batch by batch, into the pooled vector of each text.

    A whole window is its text's vector as it is. A text of several windows is accumulated in float64 (on the
    CPU: one [hidden] sum per text whose windows are not all done) and handed out once its last window is in.
    """

    def __init__(self, windows: list[Window]):
        self.remaining: dict[int, int] = {}
        for window in windows:
            if not window.whole:
                self.remaining[window.row] = self.remaining.get(window.row, 0) + 1
        self.sums: dict[int, torch.Tensor] = {}
        self.weights: dict[int, int] = {}

    @property
    def chunked(self) -> bool:
        """Whether any text has more than one window."""
        return bool(self.remaining)

    def add(self, windows: list[Window], pooled: torch.Tensor, weights: list[int]) -> tuple[list[int], torch.Tensor]:
        """Take one batch's windows with their pooled vectors [len(windows), hidden] and the number of tokens each
        pooled over; return the rows this batch completes and their pooled vectors [n, hidden] (pooled's dtype and
        device). A batch of whole windows only comes back as it is (the same tensor, so truncate mode and texts
        that fit one window are embedded exactly as before)."""
        if all(window.whole for window in windows):
            return [window.row for window in windows], pooled
        rows, vectors = [], []
        host = pooled.detach().to("cpu", torch.float64)
        for position, (window, weight) in enumerate(zip(windows, weights)):
            if window.whole:
                rows.append(window.row)
                vectors.append(pooled[position])
                continue
            k = window.row
            weighted = host[position] * weight
            self.sums[k] = weighted if k not in self.sums else self.sums[k] + weighted
            self.weights[k] = self.weights.get(k, 0) + weight
            self.remaining[k] -= 1
            if self.remaining[k] == 0:
                total = self.sums.pop(k) / max(self.weights.pop(k), 1)
                rows.append(k)
                vectors.append(total.to(pooled.device, pooled.dtype))
        if not rows:
            return [], pooled[:0]
        return rows, torch.stack(vectors)
