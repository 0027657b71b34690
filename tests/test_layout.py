"""The repository layout shadows no installed package, and current transformers keeps our attention and pooling.

The top level keeps the layout the project was specified with (kernels/ and csrc/ beside llm2vec_fast/), but no
top-level folder is a regular package: a `kernels/__init__.py` at the root would shadow Hugging Face's `kernels`
package, which transformers >= 5.25 imports, whenever Python runs from the root. The package reaches the two
folders through the links llm2vec_fast/kernels and llm2vec_fast/csrc.
"""

import importlib.util
import os
import sys

import pytest
import torch
from repo_root import REPO, check_from_repo_root

from llm2vec_fast import LLM2Vec, encoder, modeling


def test_no_top_level_folder_but_the_package_is_a_regular_package():
    packages = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert packages == ["llm2vec_fast"]
    for folder in ("kernels", "csrc", "llm2vec_fast", "benchmarks", "tests"):
        assert (REPO / folder).is_dir()


@pytest.mark.parametrize("name", ["kernels", "csrc"])
def test_the_package_reaches_kernels_and_csrc_through_relative_links(name):
    link = REPO / "llm2vec_fast" / name
    assert link.is_symlink() and os.readlink(link) == f"../{name}"
    assert not (REPO / name / "__init__.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
def test_runs_from_the_repository_root_beside_hugging_face_kernels():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    check_from_repo_root(sys.executable, env)


def test_current_transformers_runs_our_attention_and_pooling(llama_dir, monkeypatch):
    """With whatever transformers and hub-kernel integration is installed, an encode calls our registered
    attention function in every layer and our pooling op once per batch, and no module's forward is anyone's but
    the model's own or ours (the suite runs with the hub offline, so a kernel fetch would raise)."""
    from transformers import AttentionInterface

    monkeypatch.setenv("LLM2VEC_FAST_NATIVE", "0")  # the C++ attention block would bypass the interface
    calls = {"attention": 0, "pool": 0}
    registered = AttentionInterface._global_mapping[modeling.ATTENTION_NAME]
    assert registered is modeling.llm2vec_attention

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return registered(*args, **kwargs)

    def counting_pool(*args, **kwargs):
        calls["pool"] += 1
        return real_pool(*args, **kwargs)

    real_pool = encoder.segment_pool
    monkeypatch.setitem(AttentionInterface._global_mapping, modeling.ATTENTION_NAME, counting_attention)
    monkeypatch.setattr(encoder, "segment_pool", counting_pool)
    model = LLM2Vec.from_pretrained(llama_dir)
    embeddings = model.encode(["a first text", "and a second, longer one"], show_progress_bar=False)
    layers = model.model.config.num_hidden_layers
    assert calls == {"attention": layers, "pool": 1}
    assert torch.isfinite(embeddings).all()
    foreign = [name for name, module in model.model.named_modules() if "forward" in vars(module)
               and not getattr(module.forward, "func", module.forward).__module__.startswith("llm2vec_fast.")]
    assert foreign == []  # our prepared CPU GEMMs are swapped in; nothing else is
    assert not getattr(model.model, "use_kernels", False)


def test_hub_kernelization_is_off_and_stays_off_across_train_and_eval(llama_dir):
    """transformers >= 5.25 kernelizes a loaded model with hub kernels when `kernels` is installed, and again on
    every train()/eval() switch, replacing layer forwards: that silently dropped our C++ norms after a train()."""
    model = LLM2Vec.from_pretrained(llama_dir)
    model.encode(["a text"], show_progress_bar=False)  # on CPU this swaps in the C++ forwards
    swapped = {name: m.forward for name, m in model.model.named_modules() if "forward" in vars(m)}
    model.train()
    model.eval()
    assert {name: m.forward for name, m in model.model.named_modules() if "forward" in vars(m)} == swapped
    assert not getattr(modeling.base_model(model.model), "use_kernels", False)


def test_patch_turns_off_the_hub_kernelization_of_a_model_loaded_by_transformers(llama_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(llama_dir)  # transformers >= 5.25 with `kernels`: use_kernels is on
    modeling.patch(model)
    assert not getattr(model, "use_kernels", False)
    with pytest.warns(UserWarning, match="use_kernels=True is not used"):
        loaded = LLM2Vec.from_pretrained(llama_dir, use_kernels=True)
    assert not getattr(modeling.base_model(loaded.model), "use_kernels", False)
