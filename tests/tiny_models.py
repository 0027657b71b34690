"""Test-side names for the random models and tokenizer of llm2vec_fast.testing."""

from llm2vec_fast.testing import (NEW_FAMILIES, WORDS, build_model_dir, build_tokenizer, corpus,  # noqa: F401
                                  model_config)

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
# NEW_FAMILIES (qwen3, gemma2, gemma3_text, phi3, llama3): tested in test_families.py and test_cpu_runtime.py with
# their own directories; FAMILIES' session fixture and the tests parametrized over it stay at the first four.


def tiny_config(family: str, vocab_size: int, **overrides):
    return model_config(family, vocab_size, max_position_embeddings=512, **overrides)
