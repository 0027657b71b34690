"""loading.py: model, adapter and released-checkpoint layouts load offline, and every broken one (missing or
extra tensors, bad configs, unsupported architectures) is an error that names the file and the fix."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_api_reliability import copy_model
from test_encoder import TEXTS, encode, load, make_adapter


def test_missing_tensor_is_an_error_naming_it(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "missing")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    del weights["layers.1.mlp.up_proj.weight"]
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 missing \(layers\.1\.mlp\.up_proj\.weight\).*Re-download"):
        load(broken)


def test_unexpected_tensor_is_an_error_naming_it(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "unexpected")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 unexpected \(layers\.0\.mlp\.extra_proj\.weight\)"):
        load(broken)


def test_config_with_more_layers_than_the_weights_is_an_error(llama_dir, tmp_path):
    broken = copy_model(llama_dir, tmp_path / "layers")
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] += 1
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=r"9 missing \(layers\.2\..*, \.\.\.\).*num_hidden_layers"):
        load(broken)


def test_causal_lm_checkpoint_with_its_lm_head_loads(tmp_path):
    from llm2vec_fast.testing import build_tokenizer, random_model

    directory = str(tmp_path / "clm")
    tokenizer = build_tokenizer(directory)
    random_model("llama", len(tokenizer), causal_lm=True, tie_word_embeddings=False).save_pretrained(directory)
    assert torch.isfinite(encode(load(directory), TEXTS)).all()


def drop_adapter_tensors(adapter_dir, keep):
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    weights = load_file(path)
    names = sorted(weights)
    save_file({k: weights[k] for k in names[:keep]}, path)
    return len(names) - keep


@pytest.mark.parametrize("layout", ["second-adapter", "released"])
def test_adapter_missing_tensors_is_an_error(llama_dir, tmp_path, layout):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    assert drop_adapter_tensors(adapter, keep=12) == 16
    with pytest.raises(ValueError, match=r"16 missing \(base_model\.model\.layers\..*lora_.*Re-save"):
        if layout == "released":
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(llama_dir, name), os.path.join(adapter, name))
            load(adapter)
        else:
            load(llama_dir, peft_model_name_or_path=adapter)


def test_adapter_with_unexpected_tensors_is_an_error(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(path)
    weights["base_model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, path)
    with pytest.raises(ValueError, match=r"1 unexpected \(base_model\.model\.layers\.0\.mlp\.extra\.lora_A"):
        load(llama_dir, peft_model_name_or_path=adapter)


def test_adapter_directory_without_weights_is_named(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"adapter'.*no adapter weights \(adapter_model\.safetensors"):
        load(llama_dir, peft_model_name_or_path=adapter)


@pytest.mark.parametrize("content, words", [
    ('{"skip_instruction": "yes"}', 'skip_instruction is "yes", but it must be true or false'),
    ('{"max_length": 12.5}', "max_length is 12.5, but it must be a positive integer"),
    ('{"doc_max_length": true}', "doc_max_length is true, but it must be a positive integer"),
    ('{"pooling_mode": "cls"}', 'pooling_mode is "cls", but it must be one of mean'),
    ('{"pooling_mode": "mean",}', "is not valid JSON (Expecting"),
    ("null", "must hold a JSON object ({...}), not null"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_llm2vec_config_names_the_file(llama_dir, tmp_path, content, words):
    directory = copy_model(llama_dir, tmp_path / "model")
    with open(os.path.join(directory, "llm2vec_config.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=__import__("re").escape(os.path.join(directory, "llm2vec_config.json"))) \
            as caught:
        load(directory)
    assert words in str(caught.value)


@pytest.mark.parametrize("content, words", [("{not json", "is not valid JSON"), ("null", "not null")])
@pytest.mark.parametrize("layout", ["second-adapter", "released"])
def test_bad_adapter_config_names_the_file(llama_dir, tmp_path, content, words, layout):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    if layout == "released":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(llama_dir, name), os.path.join(adapter, name))
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=__import__("re").escape(os.path.join(adapter, "adapter_config.json"))) \
            as caught:
        load(adapter) if layout == "released" else load(llama_dir, peft_model_name_or_path=adapter)
    assert words in str(caught.value)


def test_batch_size_in_from_pretrained_points_to_encode(llama_dir):
    with pytest.raises(TypeError, match=r"batch_size is an argument of encode\(\)"):
        load(llama_dir, batch_size=True)


def test_adapter_merged_equals_unmerged(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    base = encode(load(llama_dir), TEXTS)
    unmerged = encode(load(llama_dir, peft_model_name_or_path=adapter), TEXTS)
    merged = encode(load(llama_dir, peft_model_name_or_path=adapter, merge_peft=True), TEXTS)
    assert (unmerged - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)


def test_released_checkpoint_layout(llama_dir, tmp_path):
    """A directory with the base config + adapter files (no base weights) merges its adapter onto its base."""
    released = make_adapter(llama_dir, str(tmp_path / "released"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(llama_dir, name)) as src, open(os.path.join(released, name), "w") as dst:
            dst.write(src.read())
    with open(os.path.join(released, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": "weighted_mean"}, f)
    model = load(released)
    assert model.pooling_mode == "weighted_mean"
    expected = encode(load(llama_dir, peft_model_name_or_path=released, merge_peft=True,
                           pooling_mode="weighted_mean"), TEXTS)
    torch.testing.assert_close(encode(model, TEXTS), expected, atol=1e-5, rtol=1e-4)
    # A second adapter on top stays unmerged, as in the reference.
    second = make_adapter(llama_dir, str(tmp_path / "second"), seed=1)
    stacked = load(released, peft_model_name_or_path=second)
    assert type(stacked.model).__name__ == "PeftModel"


def test_adapter_for_another_base_is_rejected(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "wide"), hidden_size=96)
    with pytest.raises(ValueError, match="does not fit the base model"):
        load(llama_dir, peft_model_name_or_path=adapter)


def test_bad_model_directories(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="missing': no such directory"):
        load(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="never downloads"):  # a hub id that is not in the local cache
        load("no-owner/no-such-model", cache_dir=str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(str(tmp_path / "empty"))
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with open(os.path.join(llama_dir, "config.json")) as f:
        (incomplete / "config.json").write_text(f.read())
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load(str(incomplete))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="llama, mistral, qwen2, gemma"):
        load(str(tmp_path / "gpt2"))


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "models/v1/final"])
def test_a_missing_local_path_gets_no_hub_download_hint(name):
    with pytest.raises(FileNotFoundError, match="no such directory") as raised:
        load(name)
    assert "hf download" not in str(raised.value)
