"""The `llm2vec-fast encode` job: a corpus in, resumable shards of embeddings out.

corpus.py reads line corpora into shards of line numbers, pipeline.py tokenizes the next shard while the current
one is encoded, shards.py owns the output directory (atomic shard writes, progress, fingerprint, manifest) and
reads it back (`load_embeddings`), fingerprint.py hashes the files an embedding depends on, distributed.py is the
torchrun process group. The command line that drives them is llm2vec_fast/cli/encode.py.
"""

from .shards import load_embeddings

__all__ = ["load_embeddings"]
