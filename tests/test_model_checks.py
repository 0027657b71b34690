"""model_checks.py: nothing in a model directory runs as code, nothing prompts, and a broken or absurd config is
named before transformers allocates anything."""

import ast
import io
import json
import math
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main
from llm2vec_fast.model_checks import ModelDirectoryError
from test_encoder import make_adapter

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "llm2vec_fast"
# Custom code that would leave a marker file if anything ever ran it.
CUSTOM_CODE = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


def model_copy(llama_dir, tmp_path, edit=None, name="config.json"):
    directory = tmp_path / "model"
    shutil.copytree(llama_dir, directory)
    if edit is not None:
        path = directory / name
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_directory_that_names_custom_code_is_refused_and_nothing_runs(llama_dir, tmp_path, config_file):
    directory = model_copy(llama_dir, tmp_path, lambda c: c.update(
        auto_map={"AutoTokenizer": ["custom.Tokenizer", None], "AutoModel": "custom.Model"}), config_file)
    (directory / "custom.py").write_text(CUSTOM_CODE)
    with pytest.raises(ModelDirectoryError, match=rf"{config_file} names custom code .*never runs code"):
        LLM2Vec.from_pretrained(str(directory))
    assert not (directory / "RAN").exists()


def test_encode_from_stdin_never_prompts_and_never_reads_the_corpus_as_an_answer(llama_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    directory = model_copy(llama_dir, tmp_path, lambda c: c.update(auto_map={"AutoTokenizer": ["custom.T", None]}),
                           "tokenizer_config.json")
    (directory / "custom.py").write_text(CUSTOM_CODE)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\nthe first line\nthe second line\n"))
    status = main(["encode", "--model", str(directory), "--input", "-", "--output", str(tmp_path / "out"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1 and "tokenizer_config.json names custom code" in err and "Traceback" not in err
    assert not (directory / "RAN").exists()


def test_every_transformers_loader_in_the_package_refuses_remote_code():
    """Every Auto*/tokenizer from_pretrained call in llm2vec_fast passes trust_remote_code=False (NO_REMOTE_CODE)."""
    unguarded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained"):
                continue
            owner = ast.unparse(node.func.value)
            if not (owner.startswith("Auto") or owner.startswith("auto_")):
                continue
            guarded = any(k.arg is None and ast.unparse(k.value) == "NO_REMOTE_CODE" for k in node.keywords) or any(
                k.arg == "trust_remote_code" and ast.unparse(k.value) == "False" for k in node.keywords)
            if not guarded:
                unguarded.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {owner}.from_pretrained")
    assert not unguarded, unguarded


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.pop("hidden_size"), "has no 'hidden_size'"),
    (lambda c: c.update(num_attention_heads=0), "num_attention_heads is 0; it must be a whole number from 1"),
    (lambda c: c.update(hidden_size=1e9), "hidden_size is 1000000000.0; it must be a whole number"),
    (lambda c: c.update(vocab_size=10 ** 12), "vocab_size is 1000000000000; it must be a whole number"),
    (lambda c: c.update(num_hidden_layers=10 ** 6), "num_hidden_layers is 1000000; it must be a whole number"),
    (lambda c: c.update(num_key_value_heads=3), r"num_attention_heads \(4\) is not a multiple of num_key_value"),
    (lambda c: c.update(rope_theta=math.nan), "rope_theta is nan; it must be a positive finite number"),
    (lambda c: c.update(hidden_size=65536), "describes a model of at least .* parameters, but the weights"),
], ids=["no-hidden-size", "zero-heads", "float-size", "huge-vocab", "million-layers", "kv-heads", "nan-rope",
        "config-of-a-larger-model"])
def test_an_absurd_config_is_named_before_anything_is_allocated(llama_dir, tmp_path, edit, words):
    directory = model_copy(llama_dir, tmp_path, edit)
    with pytest.raises(ModelDirectoryError, match=words) as raised:
        LLM2Vec.from_pretrained(str(directory), dtype=torch.float32)
    assert str(directory / "config.json") in str(raised.value)


def test_a_deeply_nested_config_is_an_error_naming_the_file(llama_dir, tmp_path):
    directory = model_copy(llama_dir, tmp_path)
    (directory / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="config.json is not valid JSON \\(nested too deeply\\)"):
        LLM2Vec.from_pretrained(str(directory))


def test_nan_adapter_weights_give_an_error_not_nan_embeddings(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(path)
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, path)
    model = LLM2Vec.from_pretrained(llama_dir, peft_model_name_or_path=adapter, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"non-finite embeddings \(NaN or inf\) for 2 of 2 input\(s\) \(indices 0, 1\)"):
        model.encode(["a text", "another"], show_progress_bar=False)


def test_an_adapter_with_integer_tensors_is_refused(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    path = os.path.join(adapter, "adapter_model.safetensors")
    weights = load_file(path)
    first = sorted(weights)[0]
    weights[first] = weights[first].to(torch.int32)
    save_file(weights, path)
    with pytest.raises(ValueError, match=rf"non-float tensors \(1: {first} is I32\)"):
        LLM2Vec.from_pretrained(llama_dir, peft_model_name_or_path=adapter)


def test_a_bin_checkpoint_with_pickled_objects_is_refused_without_torchs_weights_only_false_advice(llama_dir,
                                                                                                     tmp_path):
    import argparse

    directory = model_copy(llama_dir, tmp_path)
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    weights["extra"] = argparse.Namespace(note="not a tensor")  # what torch's weights_only load refuses
    torch.save(weights, directory / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"hold pickled objects other than tensors, so they were not loaded") as raised:
        LLM2Vec.from_pretrained(str(directory))
    assert "weights_only=False" not in str(raised.value)
