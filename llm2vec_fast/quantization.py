"""Smaller embeddings: Matryoshka truncation and storage precisions, with sentence-transformers' semantics.

The order is sentence-transformers' (`SentenceTransformer.encode(truncate_dim=..., normalize_embeddings=True,
precision=...)`): truncate to the first N dimensions, then L2-normalize (if asked), then quantize. `finish` applies
that order and is what `LLM2Vec.encode`, the encode job and the Ray predictor call, so they store the same bytes.

Precisions (choices.PRECISIONS), as `sentence_transformers.quantize_embeddings` defines them:
- float32, float16: a cast.
- int8, uint8: per-dimension scalar quantization. With ranges [2, dim] (row 0 the minima, row 1 the maxima, as float32),
  value x of dimension d goes to bucket floor((x - min_d) / step_d) clipped to 0..255, step_d = (max_d - min_d) / 255
  (1 where max_d == min_d); uint8 stores the bucket, int8 the bucket - 128. Ranges come from a calibration sample
  (`calibration_ranges`): values outside them are clipped, so a corpus must be quantized with one fixed set.
- binary, ubinary: one bit per dimension, set where x > 0, packed 8 to a byte (np.packbits, big-endian bit order,
  the last byte zero-padded): [N, ceil(dim / 8)]. ubinary stores the byte, binary the byte - 128 as int8. FAISS'
  IndexBinaryFlat reads the ubinary bytes (or binary's viewed as uint8 after adding 128).
"""

from __future__ import annotations

import numpy as np
import torch

from .choices import PRECISIONS

_STORED_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
                  "binary": np.int8, "ubinary": np.uint8}
SCALAR = ("int8", "uint8")  # the precisions that need ranges
BINARY = ("binary", "ubinary")


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else ValueError naming them."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return precision


def resolve_precision(precision: str | None, dtype: str | None, names: tuple[str, str]) -> str:
    """The one precision of a caller that also takes an older float-dtype option (encode --shard-dtype, the Ray
    predictor's embedding_dtype): `precision`, else `dtype` (float32 or float16), else float32. Both given and
    different is a ValueError; names: the two options' names as the caller's user knows them."""
    precision_name, dtype_name = names
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown {precision_name} {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if dtype is not None and dtype not in ("float32", "float16"):
        raise ValueError(f"{dtype_name} must be float32 or float16, got {dtype!r}; other storage precisions are "
                         f"chosen with {precision_name}.")
    if precision is not None and dtype is not None and precision != dtype:
        raise ValueError(f"{dtype_name} {dtype} and {precision_name} {precision} contradict each other: "
                         f"{precision_name} decides the stored dtype ({dtype_name} is its older name for "
                         f"float32/float16). Pass only {precision_name} {precision}.")
    return precision or dtype or "float32"


def stored_dtype(precision: str) -> np.dtype:
    """The numpy dtype embeddings of `precision` are stored in (binary: int8, ubinary: uint8)."""
    return np.dtype(_STORED_DTYPES[check_precision(precision)])


def stored_width(dim: int, precision: str) -> int:
    """Columns of a stored [N, *] array of `dim`-dimensional embeddings: dim, or ceil(dim / 8) packed bytes."""
    return -(-dim // 8) if check_precision(precision) in BINARY else dim


def bytes_per_vector(dim: int, precision: str) -> int:
    """Bytes one stored embedding takes."""
    return stored_width(dim, precision) * stored_dtype(precision).itemsize


def check_truncate_dim(truncate_dim: int | None, embedding_dim: int) -> int | None:
    """`truncate_dim` if it is None or an int in 1..embedding_dim, else ValueError (truncating never pads)."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)) \
            or not 1 <= truncate_dim <= embedding_dim:
        raise ValueError(f"truncate_dim must be an integer from 1 to the model's embedding dimension {embedding_dim}, "
                         f"got {truncate_dim!r}; leave it unset to keep all {embedding_dim} dimensions.")
    return int(truncate_dim)


def truncate_dim(embeddings, dim: int | None):
    """The first `dim` dimensions of embeddings [..., D] (numpy array or tensor; a view), or embeddings as they are
    for dim None. dim must be in 1..D (`check_truncate_dim`)."""
    if dim is None:
        return embeddings
    check_truncate_dim(dim, embeddings.shape[-1])
    return embeddings[..., :dim]


def calibration_ranges(embeddings) -> np.ndarray:
    """Per-dimension [min, max] of a calibration sample [N, dim] (N >= 2, finite): float32 [2, dim], the `ranges` of
    `quantize` and of sentence-transformers' quantize_embeddings."""
    sample = _as_numpy(embeddings)
    if sample.ndim != 2 or sample.shape[0] < 2:
        raise ValueError(f"int8/uint8 ranges need a calibration sample of at least 2 embeddings [N, dim], got shape "
                         f"{tuple(sample.shape)}; pass ranges (calibration_ranges of a representative sample) "
                         f"instead.")
    _check_finite(sample, "calibration embeddings")
    return np.vstack((sample.min(axis=0), sample.max(axis=0))).astype(np.float32)


def check_ranges(ranges, dim: int) -> np.ndarray:
    """`ranges` as float32 [2, dim] (minima, maxima), or ValueError saying what is wrong with it."""
    array = _as_numpy(ranges)
    if array.shape != (2, dim):
        raise ValueError(f"ranges must have shape [2, {dim}] (per-dimension minima and maxima of the "
                         f"{dim}-dimensional embeddings, after any truncate_dim), got {tuple(array.shape)}.")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"ranges must be numbers, got dtype {array.dtype}.")
    array = array.astype(np.float32)
    _check_finite(array, "ranges")
    if (array[0] > array[1]).any():
        first = int(np.flatnonzero(array[0] > array[1])[0])
        raise ValueError(f"ranges row 0 must hold the minima and row 1 the maxima; dimension {first} has minimum "
                         f"{array[0, first]} above maximum {array[1, first]}.")
    return array


def check_options(truncate_dim: int | None, precision: str, ranges, embedding_dim: int):
    """(truncate_dim, ranges as float32 [2, dim] or None) checked against a model's embedding_dim before anything is
    encoded; ValueError names a bad one. ranges are for the truncated width and only for int8/uint8."""
    truncate_dim = check_truncate_dim(truncate_dim, embedding_dim)
    check_precision(precision)
    if ranges is None:
        return truncate_dim, None
    if precision not in SCALAR:
        raise ValueError(f"ranges apply to int8/uint8 only; precision {precision!r} uses none. Leave ranges out, or "
                         f"pass precision='int8' or 'uint8'.")
    return truncate_dim, check_ranges(ranges, truncate_dim or embedding_dim)


def quantize(embeddings, precision: str, ranges=None):
    """embeddings [N, dim] (float, finite) in `precision`, as `sentence_transformers.quantize_embeddings` gives them
    for the same float32 ranges. ranges: [2, dim] for int8/uint8; None calibrates on `embeddings` themselves (as
    sentence-transformers does; needs N >= 2), which makes each call's buckets different: quantize a corpus with
    fixed ranges. A tensor comes back as a CPU tensor, an array as an array."""
    check_precision(precision)
    is_tensor = isinstance(embeddings, torch.Tensor)
    array = _as_numpy(embeddings)
    if array.dtype.kind != "f":
        raise ValueError(f"embeddings to quantize must be floats, got {array.dtype}.")
    if precision in ("float32", "float16"):
        result = array.astype(_STORED_DTYPES[precision], copy=False)
    else:
        _check_finite(array, "embeddings")  # NaN > 0 is False: a NaN would become a valid-looking code
        if precision in SCALAR:
            ranges = calibration_ranges(array) if ranges is None else check_ranges(ranges, array.shape[-1])
            starts = ranges[0]
            steps = (ranges[1] - starts) / 255
            steps = np.where(steps == 0, 1, steps)
            buckets = np.clip(np.floor((array - starts) / steps), 0, 255)
            result = buckets.astype(np.uint8) if precision == "uint8" else (buckets - 128).astype(np.int8)
        else:
            packed = np.packbits(array > 0, axis=-1)
            result = packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    return torch.from_numpy(np.ascontiguousarray(result)) if is_tensor else result


def normalize_where(normalize: bool, truncate_dim: int | None) -> tuple[bool, bool]:
    """(normalize in the encoder, normalize in `finish`): a full-width vector is normalized where the encoder
    normalizes it today (so float32 results stay what they were), a truncated one only after truncation."""
    return normalize and truncate_dim is None, normalize and truncate_dim is not None


def finish(embeddings: torch.Tensor, *, truncate_dim: int | None = None, normalize: bool = False,
           precision: str = "float32", ranges=None) -> torch.Tensor:
    """Truncate, then (normalize) L2-normalize, then quantize float32 embeddings [N, D] (CPU tensor): the stored
    embeddings [N, stored_width] as a CPU tensor of stored_dtype(precision). normalize: whether to normalize here
    (see `normalize_where`); ranges: as `quantize`."""
    out = _truncate(embeddings, truncate_dim)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    if precision == "float32":
        return out.contiguous()
    return quantize(out, precision, ranges)


def _truncate(embeddings, dim):
    return truncate_dim(embeddings, dim)


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    return np.asarray(values)


def _check_finite(array: np.ndarray, what: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        rows = np.flatnonzero(~np.isfinite(array.reshape(array.shape[0], -1) if array.ndim > 1 else array[:, None])
                              .all(axis=1))
        raise ValueError(f"{what} hold NaN or inf (in {rows.size} row(s), the first row {int(rows[0])}); they cannot "
                         f"be quantized.")
