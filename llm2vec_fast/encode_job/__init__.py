"""The `llm2vec-fast encode` job: a corpus in, resumable shards of embeddings out.

config.py is the job's typed description (`EncodeJobConfig`), and job.py runs it: locally, under torchrun or on
Ray (ray_engine.py). sources.py is the input, whatever its kind: line corpora (corpus.py: .txt, .jsonl, stdin) or
Arrow tables (tables.py: Parquet, `datasets` directories), all cut into shards of line (row) numbers. pipeline.py
tokenizes the next shard while the current one is encoded. shards.py writes the output directory (atomic shard
writes, progress, fingerprint, manifest; the file names are in layout.py, a shard's files in shard_formats.py and
parquet_shards.py), and reader.py reads it back (`load_embeddings`, with the memory-mapped view of stacked.py).
fingerprint.py says what identifies a run and hashes the files an embedding depends on, distributed.py is the
torchrun process group, storage.py what a shard stores (--precision, --truncate-dim, the int8/uint8 ranges). The command line that builds the config is llm2vec_fast/cli/encode.py.
"""

from .reader import LoadedEmbeddings, load_embeddings

__all__ = ["LoadedEmbeddings", "load_embeddings"]
