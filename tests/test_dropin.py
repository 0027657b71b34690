"""Drop-in gaps with llm2vec 0.2.3 (issue 11, item 6): the model methods that reference code and HF Trainer call on
an LLM2Vec, and saved directories that llm2vec 0.2.3 (transformers 4.4x, tokenizers 0.19, peft 0.12) can load."""

import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from llm2vec_fast.reference_files import make_reference_loadable
from test_encoder import TEXTS, encode, load, make_adapter

# The LoraConfig fields of peft 0.12 (the reference era), which builds its config from every key of the file.
PEFT_0_12_LORA_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora"}
# Set to a Python with llm2vec==0.2.3 (transformers 4.44, peft 0.12) to load our saves with the reference itself.
REFERENCE_PYTHON = os.environ.get("LLM2VEC_FAST_REFERENCE_PYTHON")


@pytest.fixture
def peft_model(llama_dir, tmp_path):
    """An unmerged adapter, trainable (PEFT loads a saved adapter frozen) as a training script would make it."""
    model = load(llama_dir, peft_model_name_or_path=make_adapter(llama_dir, str(tmp_path / "adapter")))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def loss_of(model, texts=("the cat sat", "a big dog ran quickly to the river")):
    return model.embed_batch(model.make_batch(model.tokenize_inputs(list(texts)))).pow(2).mean()


# ----------------------------------------------------------------------------------------- model methods


def test_attributes_trainer_reads(llama_dir):
    model = load(llama_dir)
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.config.model_type == "llama" and model.main_input_name == "input_ids"
    assert model.supports_gradient_checkpointing
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()
    assert all(name.startswith("model.") for name, _ in model.named_parameters())


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(peft_model, reentrant):
    peft_model.train()
    loss_of(peft_model).backward()
    expected = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    peft_model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the name transformers deprecates is not called under it
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert peft_model.is_gradient_checkpointing and peft_model.is_activation_checkpointing
    loss_of(peft_model).backward()
    got = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert expected and set(got) == set(expected)  # reentrant checkpointing reaches the adapter (input grads on)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    peft_model.gradient_checkpointing_disable()
    assert not peft_model.is_gradient_checkpointing


def test_input_embeddings_and_resize(llama_dir):
    model = load(llama_dir)
    size = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(size + 8, pad_to_multiple_of=16)
    assert model.get_input_embeddings().num_embeddings % 16 == 0 and model.config.vocab_size >= size + 8
    assert encode(model, TEXTS).shape == (len(TEXTS), model.config.hidden_size)
    replacement = nn.Embedding(model.config.vocab_size, model.config.hidden_size)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement


def test_enable_input_require_grads(llama_dir):
    model = load(llama_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    assert loss_of(model).requires_grad  # frozen weights, yet a graph from the embeddings on
    model.disable_input_require_grads()
    assert not loss_of(model).requires_grad


def test_trainable_parameters(peft_model, llama_dir, capsys):
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    peft_model.print_trainable_parameters()
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    load(llama_dir).print_trainable_parameters()
    assert "trainable%: 100.0000" in capsys.readouterr().out


def test_save_pretrained_takes_trainer_arguments(peft_model, tmp_path):
    peft_model.save_pretrained(str(tmp_path / "saved"), state_dict=peft_model.state_dict(), safe_serialization=True)
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()
    torch.testing.assert_close(encode(load(str(tmp_path / "saved")), TEXTS), encode(peft_model, TEXTS),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="safetensors only"):
        peft_model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    with pytest.raises(ValueError, match="keys of LLM2Vec.state_dict"):
        peft_model.save_pretrained(str(tmp_path / "bad"), state_dict={"layers.0.weight": torch.zeros(1)})


def test_hf_trainer_runs_two_steps_with_gradient_checkpointing(peft_model, tmp_path):
    import dataclasses

    from transformers import Trainer, TrainingArguments

    class EmbeddingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return loss_of(model, inputs["texts"])

    # transformers 5.2x calls it activation checkpointing; 5.17 has only the gradient_checkpointing name.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", remove_unused_columns=False, disable_tqdm=True,
                             **{checkpointing: True, f"{checkpointing}_kwargs": {"use_reentrant": False}})
    data = [{"text": t} for t in ("the cat sat", "a dog", "the sun and the moon", "blue river city")]
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    trainer = EmbeddingTrainer(model=peft_model, args=args, train_dataset=data,
                               data_collator=lambda rows: {"texts": [r["text"] for r in rows]})
    trainer.train()
    assert trainer.state.global_step == 2 and peft_model.is_gradient_checkpointing
    changed = [n for n, p in peft_model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


# ------------------------------------------------------------------------------- loadable by the reference


def saved_json(directory, name):
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


def test_saved_files_use_fields_transformers_4_44_reads(llama_dir, tmp_path):
    from transformers import AutoTokenizer

    model = load(llama_dir)
    model.save(str(tmp_path / "saved"))
    tokenizer_config = saved_json(tmp_path / "saved", "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # 4.4x has no TokenizersBackend
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids there
    merges = saved_json(tmp_path / "saved", "tokenizer.json")["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # tokenizers 0.19's form
    config = saved_json(tmp_path / "saved", "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    # transformers 5 reads the rewritten files identically.
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    texts = [t if isinstance(t, str) else " ".join(t) for t in TEXTS] + ["Unicode: naïve café", "  spaced  out "]
    assert [reloaded(t)["input_ids"] for t in texts] == [model.tokenizer(t)["input_ids"] for t in texts]
    torch.testing.assert_close(encode(load(str(tmp_path / "saved")), TEXTS), encode(model, TEXTS))


def test_saved_adapter_config_has_only_keys_peft_0_12_knows(peft_model, tmp_path):
    from peft import PeftConfig

    peft_model.save(str(tmp_path / "saved"))
    config = saved_json(tmp_path / "saved", "adapter_config.json")
    assert set(config) <= PEFT_0_12_LORA_FIELDS
    assert PeftConfig.from_pretrained(str(tmp_path / "saved")) == peft_model.model.peft_config["default"]


def test_scaled_rope_is_also_written_as_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_parameters": rope}))
    make_reference_loadable(str(tmp_path))
    config = saved_json(tmp_path, "config.json")
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}


REFERENCE_SCRIPT = """
import sys, numpy as np
from llm2vec import LLM2Vec
base, adapter, out = sys.argv[1], sys.argv[2] if sys.argv[2] != "-" else None, sys.argv[3]
model = LLM2Vec.from_pretrained(base, peft_model_name_or_path=adapter, torch_dtype="auto",
                                attn_implementation="eager")
plain = ["the cat sat on the mat", "the big dog ran quickly", "sun"]
pairs = [["find the animal:", "the big dog ran quickly"], ["q:", "coffee and tea"]]
np.save(out, np.concatenate([model.encode(plain, show_progress_bar=False, convert_to_numpy=True),
                             model.encode(pairs, show_progress_bar=False, convert_to_numpy=True)]))
"""


def ours(model):
    plain = ["the cat sat on the mat", "the big dog ran quickly", "sun"]
    pairs = [["find the animal:", "the big dog ran quickly"], ["q:", "coffee and tea"]]
    return np.concatenate([encode(model, plain).numpy(), encode(model, pairs).numpy()])


def reference_embeddings(base, adapter, tmp_path):
    out = tmp_path / f"reference-{len(os.listdir(tmp_path))}.npy"
    result = subprocess.run([REFERENCE_PYTHON, "-c", REFERENCE_SCRIPT, str(base), str(adapter or "-"), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out)


@pytest.mark.skipif(not REFERENCE_PYTHON, reason="set LLM2VEC_FAST_REFERENCE_PYTHON to a Python with llm2vec 0.2.3")
def test_llm2vec_0_2_3_loads_our_saves_and_embeds_alike(peft_model, llama_dir, tmp_path):
    merged_base = tmp_path / "base"
    load(llama_dir).save(str(merged_base))
    adapter = tmp_path / "adapter"
    peft_model.save(str(adapter))
    np.testing.assert_allclose(reference_embeddings(merged_base, None, tmp_path), ours(load(llama_dir)), atol=2e-5)
    expected = ours(peft_model)
    # Our adapter save: as the released layout alone, and as base + adapter.
    np.testing.assert_allclose(reference_embeddings(adapter, None, tmp_path), expected, atol=2e-5)
    np.testing.assert_allclose(reference_embeddings(merged_base, adapter, tmp_path), expected, atol=2e-5)
