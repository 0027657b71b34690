"""The new families through the Triton attention kernels (forward and backward), run by Triton's interpreter here
and compiled on a GPU: a tiny model of each, packed, with its windows, softcap, q/k norms and causality, gives the
embeddings and parameter gradients of the PyTorch path, which tests/test_families.py holds to the family's own
Hugging Face eager forward. The kernels themselves are held to float64 in tests/kernels/test_attention_masks.py."""

import functools

import pytest
import torch

from llm2vec_fast import modeling
from llm2vec_fast.kernels.attention import varlen_attention
from test_families import TEXTS, family_dirs, load  # noqa: F401  (family_dirs: the fixture)

# Each family in the mode of its embedders, and one causal: windows (8) shorter than most texts, Gemma 2's softcap.
CASES = [("qwen3", "bidirectional"), ("gemma2", "bidirectional"), ("gemma3_text", "bidirectional"),
         ("qwen3", "causal"), ("phi3", "causal")]


def embeddings_and_gradients(encoder, batch, weights):
    """Embeddings of `batch` and the gradients of (embeddings * weights).sum() for every attention projection."""
    encoder.model.zero_grad(set_to_none=True)
    embeddings = encoder.embed_batch(batch)
    (embeddings * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.model.named_parameters()
             if "self_attn" in name and p.grad is not None}
    return embeddings.detach(), grads


@pytest.mark.parametrize("family, mode", CASES)
def test_triton_path_matches_the_pytorch_path(family_dirs, family, mode, monkeypatch):  # noqa: F811
    encoder = load(family_dirs[family], mode)
    encoder.model.train()  # the training path: no C++ ops, gradients through the attention
    batch = encoder.make_batch(encoder.tokenize_inputs(TEXTS))
    weights = torch.randn(len(TEXTS), encoder.embedding_dim, generator=torch.Generator().manual_seed(0))
    expected, expected_grads = embeddings_and_gradients(encoder, batch, weights)

    calls = []

    def triton_attention(*args, **kwargs):
        calls.append(kwargs)
        return varlen_attention(*args, force_triton=True, **kwargs)

    monkeypatch.setattr(modeling, "varlen_attention", functools.wraps(varlen_attention)(triton_attention))
    got, got_grads = embeddings_and_gradients(encoder, batch, weights)

    layers = encoder.config.num_hidden_layers
    assert len(calls) == layers and all(c["causal"] == (mode == "causal") for c in calls)
    if family in ("gemma2", "gemma3_text", "qwen3"):
        assert any(c["window"] is not None for c in calls), "the test model should have sliding layers"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == expected_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        # Float32 sums over every token in another order: differences scale with the gradient, not per element.
        error = (got_grads[name] - grad).abs().max().item()
        assert error <= 1e-4 * grad.abs().max().item(), f"{name}: max error {error:.3g}"
