"""Test-side names for the random models and tokenizer of llm2vec_fast.testing."""

from llm2vec_fast.testing import WORDS, build_model_dir, build_tokenizer, corpus, model_config  # noqa: F401

FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def tiny_config(family: str, vocab_size: int, **overrides):
    return model_config(family, vocab_size, max_position_embeddings=512, **overrides)
