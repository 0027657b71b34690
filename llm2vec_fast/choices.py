"""The fixed choices and defaults of the options: the one place each is set, free of torch and numpy.

The code that uses them (batching, precision, the encode job) imports them from here, and so does the command
line, whose `--help`, argument errors and missing-file errors must answer without importing torch (seconds).
"""

from __future__ import annotations

from .lines import MAX_LINE_BYTES  # the shared line reader's limit, light as well

# How an encoder pools a text's hidden states (LLM2Vec.pooling_mode, --pooling).
POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
# What encode does with a text longer than max_length (LLM2Vec.long_input, --long-input): cut it (the reference's
# rule), or embed it whole in max_length windows (chunking.py).
LONG_INPUTS = ("truncate", "chunk")
# Tokens per encode batch when max_batch_tokens is not given, by device, and on CPU by GEMM dtype
# (precision.default_max_batch_tokens says which applies, and why these values).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 1024, "cpu-bf16": 4096, "cuda": 32768}
# Inputs of `encode`: line corpora, then Arrow tables.
LINE_FORMATS = ("txt", "jsonl")
TABLE_FORMATS = ("parquet", "dataset")
INPUT_FORMATS = LINE_FORMATS + TABLE_FORMATS
# How `encode` stores its shards, in which dtype, on which engine, and how many lines per shard.
OUTPUT_FORMATS = ("npy", "parquet")
SHARD_DTYPES = ("float32", "float16")
# What an embedding is stored as (LLM2Vec.encode(precision=...), encode --precision), with sentence-transformers'
# names: floats, per-dimension scalar quantization to 8 bits, or one sign bit per dimension packed 8 to a byte
# (quantization.py). SHARD_DTYPES is --shard-dtype, the older name of the first two.
PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
DEFAULT_CALIBRATION_ROWS = 10_000
ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000

__all__ = ["POOLING_MODES", "LONG_INPUTS", "DEFAULT_MAX_BATCH_TOKENS", "LINE_FORMATS", "TABLE_FORMATS", "INPUT_FORMATS",
           "OUTPUT_FORMATS", "SHARD_DTYPES", "PRECISIONS", "DEFAULT_CALIBRATION_ROWS", "ENGINES", "DEFAULT_SHARD_SIZE",
           "MAX_LINE_BYTES"]
