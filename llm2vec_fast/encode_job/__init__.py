"""The `llm2vec-fast encode` job: a corpus in, resumable shards of embeddings out.

sources.py is the input, whatever its kind: line corpora (corpus.py: .txt, .jsonl, stdin) or Arrow tables
(tables.py: Parquet, `datasets` directories), all cut into shards of line (row) numbers. pipeline.py tokenizes the
next shard while the current one is encoded. shards.py owns the output directory (atomic shard writes, progress,
fingerprint, manifest; .npy or Parquet shards, parquet_shards.py) and reads it back (`load_embeddings`, with the
memory-mapped view of stacked.py). fingerprint.py hashes the files an embedding depends on, distributed.py is the
torchrun process group, ray_engine.py runs the job on Ray Data. The command line that drives them is
llm2vec_fast/cli/encode.py.
"""

from .shards import load_embeddings

__all__ = ["load_embeddings"]
