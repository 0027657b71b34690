"""saving.py: a save writes the model or adapter, the tokenizer and llm2vec_config.json whole, replaces what an
earlier save left that would change what the directory loads as, and never writes through a planted link."""

import json
import os

import pytest
import torch
from transformers import AutoModel

from test_encoder import TEXTS, encode, load, make_adapter


def test_merged_save_over_an_adapter_save_reloads_the_merged_model(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    model = load(llama_dir, peft_model_name_or_path=adapter)
    target = tmp_path / "saved"
    model.save(str(target))
    (target / "notes.txt").write_text("the user's own file")
    model.save(str(target), merge_before_save=True)
    assert torch.equal(encode(load(str(target)), TEXTS), encode(model, TEXTS))  # not the adapter applied twice
    assert not (target / "adapter_config.json").exists() and not (target / "adapter_model.safetensors").exists()
    assert (target / "notes.txt").read_text() == "the user's own file"


def test_adapter_save_over_a_merged_save_reloads_the_adapter(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    target = tmp_path / "saved"
    merged = load(llama_dir, peft_model_name_or_path=adapter, merge_peft=True)
    merged.save(str(target))
    unmerged = load(llama_dir, peft_model_name_or_path=adapter)
    unmerged.save(str(target))
    assert not (target / "model.safetensors").exists()  # else the adapter would be applied over merged weights
    reloaded = load(llama_dir, peft_model_name_or_path=str(target))
    assert torch.equal(encode(reloaded, TEXTS), encode(unmerged, TEXTS))
    # The directory alone is the released layout (base config + adapter): it loads with the adapter merged.
    torch.testing.assert_close(encode(load(str(target)), TEXTS), encode(unmerged, TEXTS), atol=1e-5, rtol=1e-4)


def test_save_without_config_removes_a_stale_one(llama_dir, tmp_path):
    target = tmp_path / "saved"
    load(llama_dir, pooling_mode="weighted_mean").save(str(target))
    model = load(llama_dir)
    model.save(str(target), save_config=False)
    assert not (target / "llm2vec_config.json").exists()
    assert load(str(target)).pooling_mode == "mean"


def test_save_never_writes_through_a_planted_symlink(llama_dir, tmp_path):
    victim = tmp_path / "elsewhere" / "precious.bin"
    victim.parent.mkdir()
    victim.write_bytes(b"precious")
    target = tmp_path / "saved"
    target.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "llm2vec_config.json"):
        os.symlink(victim, target / name)
    model = load(llama_dir)
    model.save(str(target))
    assert victim.read_bytes() == b"precious"
    assert not any(os.path.islink(target / name) for name in os.listdir(target))
    assert torch.equal(encode(load(str(target)), TEXTS), encode(model, TEXTS))
    assert [p for p in os.listdir(tmp_path) if ".saving-" in p] == []  # no staging directory left behind


def test_save_removes_what_a_killed_save_left(llama_dir, tmp_path):
    import subprocess
    import sys

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    abandoned = tmp_path / f".saved.saving-{dead_pid}-0123456789ab"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half written")
    other = tmp_path / f".other.saving-{dead_pid}-0123456789ab"  # another destination's: not ours to judge
    other.mkdir()
    load(llama_dir).save(str(tmp_path / "saved"))
    assert not abandoned.exists() and other.exists()


def test_save_into_a_file_is_refused(llama_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        load(llama_dir).save(str(tmp_path / "file"))


def test_save_load_round_trip(llama_dir, tmp_path):
    model = load(llama_dir, pooling_mode="weighted_mean", max_length=64)
    expected = encode(model, TEXTS)
    model.save(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "llm2vec_config.json") as f:
        assert json.load(f) == {"pooling_mode": "weighted_mean", "max_length": 64, "doc_max_length": 400,
                                "skip_instruction": True}
    reloaded = load(str(tmp_path / "saved"))
    assert reloaded.pooling_mode == "weighted_mean" and reloaded.max_length == 64
    torch.testing.assert_close(encode(reloaded, TEXTS), expected)
    # Explicit arguments override the saved config; plain transformers can still read the directory.
    assert load(str(tmp_path / "saved"), pooling_mode="mean").pooling_mode == "mean"
    AutoModel.from_pretrained(str(tmp_path / "saved"))


def test_save_keeps_a_users_own_bin_weights_and_records_what_it_wrote(llama_dir, tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "pytorch_model.bin").write_bytes(b"the user's own checkpoint")
    model = load(llama_dir)
    model.save(str(target))
    assert (target / "pytorch_model.bin").read_bytes() == b"the user's own checkpoint"
    recorded = json.loads((target / ".llm2vec-fast-save.json").read_text())
    assert "model.safetensors" in recorded and "pytorch_model.bin" not in recorded
    assert torch.equal(encode(load(str(target)), TEXTS), encode(model, TEXTS))


def test_a_foreign_adapter_that_would_change_the_load_makes_the_save_refuse(llama_dir, tmp_path):
    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    target = tmp_path / "saved"
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((tmp_path / "adapter" / name).read_bytes())  # not written by a save of ours
    with pytest.raises(FileExistsError, match=r"holds adapter_config\.json, adapter_model\.safetensors, which an "
                                              r"earlier save of llm2vec-fast did not write.*Move them elsewhere"):
        load(llama_dir).save(str(target))
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]  # nothing moved
    assert adapter
