"""precision.py: the default token budget per device and GEMM dtype, and what dtype="mixed" / "auto" resolve to."""

import pytest
import torch

from llm2vec_fast import LLM2Vec


def test_default_token_budget_follows_the_matmul_dtype():
    """CPU: 1024 tokens for fp32 GEMMs, 4096 for bf16 ones (pure bf16 or the mixed mode), as measured (docs/performance.md)."""
    from llm2vec_fast.precision import DEFAULT_MAX_BATCH_TOKENS, default_max_batch_tokens

    assert default_max_batch_tokens("cpu") == default_max_batch_tokens("cpu", torch.float32) == 1024
    assert default_max_batch_tokens("cpu", torch.bfloat16) == 4096
    assert default_max_batch_tokens("cuda", torch.bfloat16) == DEFAULT_MAX_BATCH_TOKENS["cuda"]


@pytest.mark.parametrize("dtype, expected", [(torch.float32, 1024), (torch.bfloat16, 4096), ("mixed", 4096)],
                         ids=["fp32", "bf16", "mixed"])
def test_encoder_default_budget_by_dtype(llama_dir, dtype, expected):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=dtype)
    assert encoder.default_batch_tokens() == encoder.default_batch_tokens("cpu") == expected
    assert LLM2Vec.from_pretrained(llama_dir, dtype=dtype, max_batch_tokens=64).max_batch_tokens == 64
