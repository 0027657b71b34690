"""Encoding a corpus shard by shard, with reading, parsing and tokenizing of the next shard overlapped with the
encoding of the current one.

The next shard is prepared in a background thread: Hugging Face fast tokenizers release the GIL while they
tokenize and torch releases it inside its kernels, so the two really run at the same time. Only one shard is
prepared ahead, which bounds the memory to two shards of token ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .corpus import InputSpec, ParsedShard, bad_lines_error
from .sources import read_shards
from ..errors import UserError
from ..tokenization import TokenizedRow

# encode_rows is called on slices of about this many batches, so the progress bar moves during a shard. A slice's
# rows are fixed by the shard's token lengths alone, so a shard is encoded identically in every run.
BATCHES_PER_SLICE = 4
_END = object()


@dataclass
class PreparedShard:
    """A shard ready to encode: its parsed lines, their tokenized rows, and the first and last input line numbers
    it spans."""

    parsed: ParsedShard
    rows: list[TokenizedRow]
    first_line: int
    last_line: int

    @property
    def index(self) -> int:
        """The shard's index in the input."""
        return self.parsed.index


class ShardSource:
    """The shards one rank must encode, parsed and tokenized, in order; finished shards are checked and skipped.

    done: shard index -> its progress record (from `OutputDir.completed`); a finished shard whose input lines
    no longer hash the same is an error rather than a silently stale result.
    num_lines: the number of input lines, known once the whole input has been read.
    """

    def __init__(self, model, spec: InputSpec, shard_size: int, rank: int, world_size: int, done: dict[int, dict],
                 skip_bad_lines: bool):
        self.model, self.spec, self.shard_size = model, spec, shard_size
        self.rank, self.world_size = rank, world_size
        self.done, self.skip_bad_lines = done, skip_bad_lines
        self.num_lines: int | None = None

    def owns(self, index: int) -> bool:
        """True when shard `index` is this rank's to encode."""
        # Round robin: every rank gets shards spread over the whole input, so the ranks finish together.
        return index % self.world_size == self.rank

    def _set_num_lines(self, n: int) -> None:
        self.num_lines = n

    def __iter__(self) -> Iterator[PreparedShard]:
        for raw in read_shards(self.spec, self.shard_size, self.owns, on_end=self._set_num_lines):
            first_line, last_line = raw.index * self.shard_size + 1, raw.last_line
            record = self.done.get(raw.index)
            if record is not None:
                if record["input_sha256"] != raw.sha256:
                    raise _changed_input(self.spec, first_line, last_line)
                continue
            parsed = raw.parse()
            if parsed.bad and not self.skip_bad_lines:
                raise bad_lines_error(self.spec.name, parsed.bad)
            rows = self.model.tokenize_inputs(parsed.pairs) if parsed.pairs else []
            yield PreparedShard(parsed, rows, first_line, last_line)


def check_input_unchanged(spec: InputSpec, shard_size: int, done: dict[int, dict]) -> None:
    """Refuse an input whose shards no longer hash as the finished output's `done` records say (for stdin, which
    no fingerprint can cover before it is read). Reads the input once, one shard at a time."""
    seen = 0
    for raw in read_shards(spec, shard_size, lambda index: True):
        record = done.get(raw.index)
        if record is None or record["input_sha256"] != raw.sha256:
            raise _changed_input(spec, raw.index * shard_size + 1, raw.last_line)
        seen += 1
    if seen != len(done):
        raise _changed_input(spec, seen * shard_size + 1, done[max(done)]["last_line"])  # the input got shorter


def _changed_input(spec: InputSpec, first_line: int, last_line: int) -> UserError:
    return UserError(f"{spec.name} lines {first_line}-{last_line} changed since the output was written; pass "
                     f"--overwrite to start again, or choose a new --output directory.")


def prefetched(iterator) -> Iterator:
    """The items of `iterator`, each next one produced in a background thread while the caller uses the current.

    A daemon thread per item rather than an executor: at Ctrl-C the interpreter must not wait for a thread that
    is still tokenizing, or blocked reading stdin.
    """
    iterator = iter(iterator)

    def start():
        box = {}

        def work():
            try:
                box["item"] = next(iterator, _END)
            except BaseException as error:  # re-raised in the caller's thread
                box["error"] = error

        thread = threading.Thread(target=work, name="llm2vec-fast-prefetch", daemon=True)
        thread.start()
        return thread, box

    pending = start()
    while True:
        thread, box = pending
        thread.join()
        if "error" in box:
            raise box["error"]
        item = box["item"]
        if item is _END:
            return
        pending = start()
        yield item


def token_slices(lengths: list[int], tokens_per_slice: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges of about `tokens_per_slice` tokens each (at least one row)."""
    slices, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if tokens and tokens + n > tokens_per_slice:
            slices.append((start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        slices.append((start, len(lengths)))
    return slices


@dataclass
class Throughput:
    """The texts and tokens encoded since `started` (a time.perf_counter reading)."""

    texts: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        """Seconds since `started` (at least 1e-9, so a rate never divides by zero)."""
        return max(time.perf_counter() - self.started, 1e-9)

    def rates(self) -> str:
        """Texts and tokens per second, as text ("1,234.5 texts/s, 56,789 tokens/s")."""
        return f"{self.texts / self.seconds:,.1f} texts/s, {self.tokens / self.seconds:,.0f} tokens/s"


def finite_in_dtype(embeddings: np.ndarray, store, shard: PreparedShard, input_name: str) -> np.ndarray:
    """A shard's float32 embeddings [rows, dim] as stored (store: a storage.Storage; a float cast, or truncated and
    quantized); UserError if a row is NaN or infinite, from the model or from a float cast (rows that would be
    silently wrong search results)."""
    _check_finite(embeddings, shard, input_name, "the model", "its weights are broken (a diverged training run?) "
                  "or overflow --dtype; check the model or try --dtype float32")
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the check below reports
        stored = store.store(embeddings)
    if stored.dtype.kind == "f":
        _check_finite(stored, shard, input_name, f"--shard-dtype {stored.dtype}",
                      "the values are too large for it; use --shard-dtype float32")
    return stored


def _check_finite(embeddings: np.ndarray, shard: PreparedShard, input_name: str, source: str, fix: str) -> None:
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if not bad.size:
        return
    lines = [shard.parsed.line_numbers[i] for i in bad[:10]]
    shown = ", ".join(map(str, lines)) + (", ..." if bad.size > 10 else "")
    raise UserError(f"{source} gave non-finite embeddings (NaN or inf) for {bad.size} line(s) of {input_name} "
                    f"(lines {shown}); nothing of shard {shard.index} (lines {shard.first_line}-{shard.last_line}) "
                    f"was written: {fix}.")


def encode_shard(model, rows: list[TokenizedRow], *, device: str, normalize: bool, max_batch_tokens: int,
                 progress, throughput: Throughput) -> np.ndarray:
    """Float32 embeddings [len(rows), hidden] of one shard's rows, in row order."""
    output = np.empty((len(rows), model.embedding_dim), dtype=np.float32)
    lengths = [len(row) for row in rows]
    for start, end in token_slices(lengths, BATCHES_PER_SLICE * max_batch_tokens):
        embeddings = model.encode_rows(rows[start:end], device=device, normalize_embeddings=normalize,
                                       max_batch_tokens=max_batch_tokens)
        output[start:end] = embeddings.numpy()
        throughput.texts += end - start
        throughput.tokens += sum(lengths[start:end])
        progress.update(end - start)
        progress.set_postfix_str(f"{throughput.tokens / throughput.seconds:,.0f} tok/s", refresh=False)
    return output
