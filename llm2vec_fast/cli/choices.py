"""The choices and defaults that `--help` shows, without importing the modules that own them.

Those modules import torch or numpy (seconds), and `llm2vec-fast --help`, an argument error or a missing file must
answer at once. So the values are copied here, each beside the name of its owner, and tests/test_cli_startup.py
checks that every copy still equals its owner's value: a changed default fails that test instead of leaving a
stale --help.
"""

from __future__ import annotations

from ..lines import MAX_LINE_BYTES  # light: the shared line reader, no numpy

# llm2vec_fast.batching.POOLING_MODES
POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
# llm2vec_fast.precision.DEFAULT_MAX_BATCH_TOKENS (the encoder's defaults): tokens per batch by device, and on CPU
# by GEMM dtype
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 1024, "cpu-bf16": 4096, "cuda": 32768}
# llm2vec_fast.encode_job.sources.FORMATS (line corpora, then Arrow tables)
INPUT_FORMATS = ("txt", "jsonl", "parquet", "dataset")
# llm2vec_fast.encode_job.shard_formats.OUTPUT_FORMATS
OUTPUT_FORMATS = ("npy", "parquet")
# llm2vec_fast.encode_job.config: SHARD_DTYPES, ENGINES, DEFAULT_SHARD_SIZE
SHARD_DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000

__all__ = ["POOLING_MODES", "DEFAULT_MAX_BATCH_TOKENS", "INPUT_FORMATS", "OUTPUT_FORMATS", "SHARD_DTYPES", "ENGINES",
           "DEFAULT_SHARD_SIZE", "MAX_LINE_BYTES"]
