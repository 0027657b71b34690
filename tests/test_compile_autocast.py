"""A patched tiny model's packed forward under ``torch.autocast`` (bf16 compute over fp32 weights) and under
``torch.compile``, on CPU: both run and agree with the eager fp32 forward."""

import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.modeling import run_packed

LENGTHS = [5, 1, 9]


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (sum(LENGTHS),), generator=g)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return ids, positions, cu


def test_packed_forward_under_autocast_and_compile(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    model = encoder.model
    ids, positions, cu = _inputs(model)
    with torch.no_grad():
        eager = run_packed(model, ids, positions, cu, max(LENGTHS))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = run_packed(model, ids, positions, cu, max(LENGTHS))
        compiled = torch.compile(lambda i, p, c: run_packed(model, i, p, c, max(LENGTHS)), backend="aot_eager")
        traced = compiled(ids, positions, cu)
    assert mixed.shape == eager.shape and torch.isfinite(mixed).all()
    cosine = torch.nn.functional.cosine_similarity(mixed.float(), eager, dim=-1)
    assert cosine.min() > 0.99, cosine.min()
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
