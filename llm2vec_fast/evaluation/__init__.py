"""Evaluation: text-pair similarity (STS-style files and the Lee et al. 2005 documents), the word-level linear
probe of the LLM2Vec paper, and adapters for MTEB and sentence-transformers.

- similarity.py: Pearson / Spearman of cosine similarity against human scores; pair-file and Lee readers.
- probe.py: frozen-encoder token features, a dropout + linear probe per word, accuracy and entity-level F1.
- mteb_adapter.py: `MTEBEncoder`, the object `mteb.evaluate` takes (instructions on queries only).
- st_adapter.py: `LLM2VecModule`, an input module that makes an encoder a `SentenceTransformer`.

mteb and sentence-transformers are optional (the `eval` extra); nothing here imports them at module level.
"""
