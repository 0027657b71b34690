"""How an encode job stores its embeddings: --precision (--shard-dtype is its older name for float32/float16),
--truncate-dim, and for int8/uint8 the ranges that fix the buckets.

The ranges of a run are chosen once, before its first shard, and kept in the output's ranges.npy (layout.RANGES):
--ranges FILE as given, else the per-dimension min/max of the first --calibration-rows input rows (their valid
ones), encoded and truncated/normalized exactly as the shards are. Every later step reads that file: the other
torchrun ranks (after a barrier), a resumed run, and the Ray actors (handed the values), so every shard of an output
is quantized with the same buckets. The manifest records the ranges, the fingerprint records --calibration-rows or
the sha256 of --ranges (config.identity, fingerprint.run_fingerprint), and `load_embeddings` returns them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from .. import quantization
from ..errors import UserError
from .config import EncodeJobConfig
from .corpus import InputSpec
from .layout import RANGES
from .shard_formats import npy_bytes


def resolve(config: EncodeJobConfig) -> EncodeJobConfig:
    """`config` with precision resolved (from --precision and --shard-dtype: one owner, quantization.resolve_precision)
    and shard_dtype set to the stored numpy dtype; UserError for options that contradict each other."""
    older = config.shard_dtype
    if config.precision is not None and older == quantization.stored_dtype(config.precision).name:
        older = None  # already resolved (binary's int8), or the same choice stated twice
    try:
        precision = quantization.resolve_precision(config.precision, older, ("--precision", "--shard-dtype"))
    except ValueError as error:
        raise UserError(str(error)) from None
    if config.ranges is not None:
        if precision not in quantization.SCALAR:
            raise UserError(f"--ranges sets the buckets of --precision int8 or uint8; --precision {precision} uses "
                            f"none. Leave --ranges out, or pass --precision int8 or uint8.")
        if not os.path.isfile(config.ranges):
            raise UserError(f"--ranges {config.ranges!r}: no such file; pass a .npy file of shape [2, dim] "
                            f"(per-dimension minima and maxima, e.g. saved from "
                            f"llm2vec_fast.quantization.calibration_ranges).")
    elif precision in quantization.SCALAR and config.input == "-":
        raise UserError(f"--precision {precision} calibrates its ranges on the first --calibration-rows rows of the "
                        f"input, which stdin cannot give twice; pass --ranges FILE, or a file as --input.")
    return dataclasses.replace(config, precision=precision,
                               shard_dtype=quantization.stored_dtype(precision).name)


@dataclass(frozen=True)
class Storage:
    """What a run does to the model's float32 embeddings before a shard is written (config resolved)."""

    precision: str
    truncate_dim: int | None
    normalize: bool
    ranges: np.ndarray | None

    @classmethod
    def of(cls, config: EncodeJobConfig, embedding_dim: int, ranges: np.ndarray | None = None) -> "Storage":
        """The storage of `config` for a model of `embedding_dim`; UserError for a --truncate-dim it lacks."""
        try:
            truncate_dim = quantization.check_truncate_dim(config.truncate_dim, embedding_dim)
        except ValueError as error:
            raise UserError(str(error).replace("truncate_dim", "--truncate-dim", 1)) from None
        return cls(config.precision, truncate_dim, config.normalize, ranges)

    @property
    def normalize_in_encoder(self) -> bool:
        """Whether the encoder normalizes (full-width vectors), as quantization.normalize_where decides."""
        return quantization.normalize_where(self.normalize, self.truncate_dim)[0]

    def floats(self, embeddings: np.ndarray) -> np.ndarray:
        """Float32 embeddings [N, D] from the encoder, truncated and normalized (the calibration sample's form)."""
        import torch

        after = quantization.normalize_where(self.normalize, self.truncate_dim)[1]
        return quantization.finish(torch.from_numpy(embeddings), truncate_dim=self.truncate_dim,
                                   normalize=after).numpy()

    def store(self, embeddings: np.ndarray) -> np.ndarray:
        """Float32 embeddings [N, D] from the encoder as stored: [N, stored width] of the stored dtype."""
        floats = self.floats(embeddings)
        if self.precision in quantization.SCALAR and self.ranges is None:
            raise RuntimeError("int8/uint8 storage without ranges: `ranges_of_run` must run first")
        return quantization.quantize(floats, self.precision, self.ranges)


def calibration_pairs(spec: InputSpec, rows: int) -> list[tuple[str, str]]:
    """The (instruction, text) pairs of the valid lines among the first `rows` input lines (rows), in order."""
    from .sources import read_shards

    for shard in read_shards(spec, rows, lambda index: index == 0):
        return shard.parse().pairs
    return []


def ranges_from_sample(storage: Storage, embeddings: np.ndarray, config: EncodeJobConfig) -> np.ndarray:
    """The ranges of the calibration sample's float32 encoder output [N, D] (as `Storage.floats` makes them)."""
    try:
        return quantization.calibration_ranges(storage.floats(embeddings))
    except ValueError as error:
        raise UserError(f"cannot calibrate --precision {config.precision} on the first {config.calibration_rows} "
                        f"input rows: {error} Pass more --calibration-rows, or --ranges FILE.") from None


def write_ranges(config: EncodeJobConfig, output, embedding_dim: int, calibrate) -> None:
    """Fix the run's ranges in the output's ranges.npy unless it holds them already (rank 0 / the Ray driver, after
    `OutputDir.prepare`). calibrate(): the calibration sample's ranges, called only when there is no --ranges."""
    if config.precision not in quantization.SCALAR:
        return
    path = output.file(RANGES)
    if os.path.isfile(path):
        return  # this output's ranges, fixed by the run that started it (checked when read)
    if output.completed():
        raise UserError(f"{path} is missing, but the output holds shards quantized with it; pass --overwrite to "
                        f"encode again.")
    if config.ranges is not None:
        ranges = load_ranges(config.ranges, "--ranges", config.truncate_dim or embedding_dim)
    else:
        ranges = calibrate()
    from .shards import atomic_write

    atomic_write(path, npy_bytes(ranges))


def read_ranges(config: EncodeJobConfig, output, embedding_dim: int) -> np.ndarray | None:
    """The run's ranges from the output's ranges.npy (None for a precision without ranges)."""
    if config.precision not in quantization.SCALAR:
        return None
    return load_ranges(output.file(RANGES), "the output's", config.truncate_dim or embedding_dim)


def load_ranges(path: str, what: str, dim: int) -> np.ndarray:
    """float32 ranges [2, dim] from the .npy file at `path`; UserError naming it (`what`) and the problem."""
    try:
        array = np.load(path, allow_pickle=False)
        return quantization.check_ranges(array, dim)
    except (OSError, ValueError) as error:
        raise UserError(f"{what} ranges file {path!r} cannot be used: {error}") from None


def manifest_record(config: EncodeJobConfig, output) -> dict:
    """What the manifest records of the run's ranges: their values, the file and its sha256 ({} without)."""
    if config.precision not in quantization.SCALAR:
        return {}
    with open(output.file(RANGES), "rb") as f:
        data = f.read()
    ranges = np.load(io.BytesIO(data), allow_pickle=False)
    return {"ranges": ranges.tolist(), "ranges_file": RANGES, "ranges_sha256": hashlib.sha256(data).hexdigest()}


def ranges_file_sha256(config: EncodeJobConfig) -> dict:
    """The fingerprint's record of --ranges: the sha256 of the file's content ({} without --ranges)."""
    if config.ranges is None:
        return {}
    from .fingerprint import file_sha256

    return {"ranges_sha256": file_sha256(config.ranges)}
