"""modeling.py: patch() makes every family bidirectional (or keeps it causal), and the packed and padded runs
give each text the hidden states it has alone."""

import pytest
import torch

from llm2vec_fast.modeling import is_bidirectional, patch, run_packed, run_padded
from llm2vec_fast.testing import random_model
from test_encoder import TEXTS, encode, load
from tiny_models import FAMILIES, NEW_FAMILIES


def first_token_hidden(model, ids, engine):
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        if engine == "packed":
            cu = torch.tensor([0, len(ids)], dtype=torch.int32)
            return run_packed(model.model, ids_t, torch.arange(len(ids)), cu, len(ids))[0]
        mask = torch.ones(1, len(ids), dtype=torch.long)
        bidirectional = model.model.config.is_causal is False
        return run_padded(model.model, ids_t[None], mask, bidirectional)[0, 0]


@pytest.mark.parametrize("engine", ["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bidirectional_per_family(tiny_model_dirs, family, engine):
    model = load(tiny_model_dirs[family])
    ids = model.tokenizer("the big dog ran quickly to the river and the sea")["input_ids"]
    changed = ids[:-1] + [(ids[-1] + 7) % len(model.tokenizer)]
    # The last token is more than Mistral's sliding window (4) away from the first: it must still be seen.
    assert len(ids) > 8
    delta = (first_token_hidden(model, ids, engine) - first_token_hidden(model, changed, engine)).abs().max()
    assert delta > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_baseline_ignores_later_tokens(tiny_model_dirs, family):
    model = load(tiny_model_dirs[family], enable_bidirectional=False)
    ids = model.tokenizer("the big dog ran quickly to the river")["input_ids"]
    changed = ids[:-1] + [(ids[-1] + 7) % len(model.tokenizer)]
    delta = (first_token_hidden(model, ids, "padded") - first_token_hidden(model, changed, "padded")).abs().max()
    assert delta == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded(tiny_model_dirs, family):
    packed = encode(load(tiny_model_dirs[family], engine="packed"), TEXTS)
    padded = encode(load(tiny_model_dirs[family], engine="padded"), TEXTS)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_packed_equals_padded(tiny_model_dirs, family):
    """Causal models run packed by default ("auto"), with causal attention per text (and Mistral's window)."""
    auto = load(tiny_model_dirs[family], enable_bidirectional=False, pooling_mode="last_token")
    assert auto._resolved_engine() == "packed"
    padded = load(tiny_model_dirs[family], enable_bidirectional=False, pooling_mode="last_token", engine="padded")
    torch.testing.assert_close(encode(auto, TEXTS), encode(padded, TEXTS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_patch_sets_every_flag_the_family_reads(tmp_path, family):
    """Both ways, on the installed transformers: is_causal on attention modules and configs, use_bidirectional_attention
    where the config has it (Gemma 2 / 3), and our attention selected."""
    model = random_model(family, 64)
    has_flag = hasattr(model.config, "use_bidirectional_attention")
    assert has_flag == (family in ("gemma2", "gemma3_text"))
    for bidirectional in (True, False, True):
        patch(model, bidirectional=bidirectional)
        attention = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]
        assert len(attention) == model.config.num_hidden_layers
        assert all(m.is_causal is not bidirectional for m in attention)
        assert model.config.is_causal is not bidirectional and is_bidirectional(model) is bidirectional
        if has_flag:
            assert model.config.use_bidirectional_attention is bidirectional
        assert model.config._attn_implementation == "llm2vec_fast"
