"""From tokenized rows to model batches: pooling ranges, packed (padding-free) and padded layouts, token budgets.

A pooling range is expressed in rows of the hidden states the model returns, flattened to [N, H]: for a packed
batch N is the total number of tokens, for a padded batch N = B * S. One pooling op serves both layouts.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .choices import POOLING_MODES
from .tokenization import TokenizedRow

# Our pooling modes -> (kernel mode, which range of the row it reads).
_KERNEL_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last", "last_token": "last",
                "bos_token": "first"}


def check_pooling_mode(pooling_mode: str) -> None:
    """Raise ValueError unless `pooling_mode` is one of POOLING_MODES."""
    if pooling_mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling_mode {pooling_mode!r}; choose one of {', '.join(POOLING_MODES)}.")


def check_positive_int(name: str, value) -> None:
    """Refuse anything but a positive integer (bool and float included), naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}; pass e.g. "
                        f"{name}=64.")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}; pass e.g. {name}=64.")


def kernel_mode(pooling_mode: str) -> str:
    """The pooling kernel's mode ("mean", "weighted_mean", "last" or "first") for one of POOLING_MODES."""
    return _KERNEL_MODE[pooling_mode]


def pooling_range(row: TokenizedRow, pooling_mode: str, skip_instruction: bool, bos_token_id=None) -> tuple[int, int]:
    """The row-relative [start, end) that `pooling_mode` reads.

    mean / weighted_mean: the text's tokens (everything the row holds when skip_instruction is off, or when the
    text is empty -- never padding). eos_token / last_token: the row's last token. bos_token: the row's first
    token, which must be the BOS the tokenizer added.
    """
    if pooling_mode in ("mean", "weighted_mean"):
        if skip_instruction and row.text_end > row.text_start:
            return row.text_start, row.text_end
        return 0, len(row)
    if pooling_mode == "bos_token":
        if bos_token_id is None or row.input_ids[0] != bos_token_id:
            raise ValueError(
                "bos_token pooling needs every row to start with the BOS token, but this tokenizer does not add "
                "one (or has none); use pooling_mode='mean' or a tokenizer with add_bos_token=True.")
    return 0, len(row)


@dataclass
class PackedBatch:
    """Texts concatenated into one row. input_ids/position_ids [T]; cu_seqlens int32 [B+1]; pool_* int64 [B]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pool_starts: torch.Tensor
    pool_ends: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """T, the number of tokens in the batch (a packed batch has no padding)."""
        return int(self.input_ids.numel())

    def to(self, device) -> "PackedBatch":
        """The batch with every tensor moved to `device`."""
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.pool_starts.to(device), self.pool_ends.to(device))


@dataclass
class PaddedBatch:
    """Right-padded rows. input_ids/attention_mask [B, S]; pool_* int64 [B] index the flattened [B * S] rows."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pool_starts: torch.Tensor
    pool_ends: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """The number of real (not padding) tokens: the sum of attention_mask."""
        return int(self.attention_mask.sum())

    def to(self, device) -> "PaddedBatch":
        """The batch with every tensor moved to `device`."""
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.pool_starts.to(device),
                           self.pool_ends.to(device))


def pack(rows: list[TokenizedRow], ranges: list[tuple[int, int]]) -> PackedBatch:
    """Concatenate `rows` into one PackedBatch.

    ranges: each row's row-relative [start, end) pooling range (from `pooling_range`); the batch holds them as
    offsets into the packed [T] tokens.
    """
    lengths = [len(row) for row in rows]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    input_ids = torch.tensor([t for row in rows for t in row.input_ids], dtype=torch.long)
    position_ids = torch.cat([torch.arange(n) for n in lengths]) if rows else torch.zeros(0, dtype=torch.long)
    starts = torch.tensor([o + s for o, (s, _) in zip(offsets, ranges)], dtype=torch.long)
    ends = torch.tensor([o + e for o, (_, e) in zip(offsets, ranges)], dtype=torch.long)
    return PackedBatch(input_ids, position_ids, torch.tensor(offsets, dtype=torch.int32), max(lengths, default=0),
                       starts, ends)


def round_up_tokens(batch: PackedBatch, multiple: int, pad_id: int) -> PackedBatch:
    """`batch` with a filler sequence of pad_id tokens appended so that its token count is a multiple of `multiple`
    (unchanged when it already is). The filler is a sequence of its own (the attention keeps it apart) that no
    pooling range reads, so the batch's embeddings are those of its texts.

    Why: the CPU GEMM libraries JIT-compile and keep kernels per row count, so a long bf16 encode whose batches have
    ever new token counts grows its memory by MBs per count; rounding bounds the counts to budget / multiple."""
    extra = -batch.num_tokens % multiple
    if extra == 0:
        return batch
    total = batch.num_tokens + extra
    return PackedBatch(torch.cat([batch.input_ids, torch.full((extra,), pad_id, dtype=batch.input_ids.dtype)]),
                       torch.cat([batch.position_ids, torch.arange(extra, dtype=batch.position_ids.dtype)]),
                       torch.cat([batch.cu_seqlens, torch.tensor([total], dtype=batch.cu_seqlens.dtype)]),
                       max(batch.max_seqlen, extra), batch.pool_starts, batch.pool_ends)


def pad(rows: list[TokenizedRow], ranges: list[tuple[int, int]], pad_id: int) -> PaddedBatch:
    """Right-pad `rows` (at least one) with `pad_id` into a PaddedBatch [B, S], S the longest row's length.

    ranges: each row's row-relative [start, end) pooling range (from `pooling_range`); the batch holds them as
    offsets into the flattened [B * S] rows.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row.input_ids)
        attention_mask[b, : len(row)] = 1
    starts = torch.tensor([b * width + s for b, (s, _) in enumerate(ranges)], dtype=torch.long)
    ends = torch.tensor([b * width + e for b, (_, e) in enumerate(ranges)], dtype=torch.long)
    return PaddedBatch(input_ids, attention_mask, starts, ends)


def token_budget_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Group indices into batches, longest first, each holding at most `max_batch_tokens` tokens.

    Sorting by length (stable, so equal lengths keep input order) keeps padded batches tight; for packed batches
    it makes batch sizes predictable. A row longer than the budget gets a batch of its own. Every index appears
    exactly once.
    """
    check_positive_int("max_batch_tokens", max_batch_tokens)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, current_tokens = [], [], 0
    for i in order:
        full = current and (current_tokens + lengths[i] > max_batch_tokens
                            or (max_batch_size is not None and len(current) >= max_batch_size))
        if full:
            batches.append(current)
            current, current_tokens = [], 0
        current.append(i)
        current_tokens += lengths[i]
    if current:
        batches.append(current)
    return batches


# ------------------------------------------------------------------------------- the reference's feature dicts


def reference_features(rows: list, pad_token_id: int) -> dict:
    """The reference's features of tokenized rows: left-padded `input_ids` and `attention_mask` [B, S], and
    `embed_mask` [B, S] marking each text's own tokens (what `LLM2Vec.tokenize` returns)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    embed_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        shift = width - len(row)
        input_ids[b, shift:] = torch.tensor(row.input_ids)
        attention_mask[b, shift:] = 1
        embed_mask[b, shift + row.text_start: shift + row.text_end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "embed_mask": embed_mask}


def rows_of_features(features: dict) -> list:
    """The TokenizedRows back from reference features (any padding side; no `embed_mask`: no text span)."""
    input_ids, attention_mask = features["input_ids"], features["attention_mask"]
    embed_mask = features.get("embed_mask")
    if embed_mask is None:
        embed_mask = torch.zeros_like(attention_mask)
    rows = []
    for ids, valid, text in zip(input_ids.tolist(), attention_mask.bool().tolist(), embed_mask.bool().tolist()):
        positions = [p for p, keep in enumerate(valid) if keep]
        text_positions = [k for k, p in enumerate(positions) if text[p]]
        start, end = (text_positions[0], text_positions[-1] + 1) if text_positions else (0, 0)
        rows.append(TokenizedRow([ids[p] for p in positions], start, end))
    return rows

