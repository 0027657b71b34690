"""The names of the files in an `llm2vec-fast encode` output directory, shared by the writer (shards.py) and the
reader (reader.py); shards.py's docstring describes each."""

from __future__ import annotations

FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"
LINE_NUMBERS = "line_numbers.npy"
RANGES = "ranges.npy"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
# Stored in every fingerprint: a directory is ours (and --overwrite may delete our files in it) only if it says so.
WRITTEN_BY = "llm2vec-fast encode"


def shard_stem(index: int) -> str:
    """The path of shard `index`'s files in the output directory, without suffix: "shards/shard-000042"."""
    return f"{SHARD_DIR}/shard-{index:06d}"
