"""Hugging Face conventions of `LLM2Vec.from_pretrained` (issue 11, item 5): hub ids resolve from the local cache
as `AutoModel.from_pretrained` resolves them, never downloading; arguments we override are named, not dropped."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.loading import warn_if_spread as _warn_if_spread
from test_encoder import TEXTS, encode

MAIN_SHA = "a" * 40
BRANCH_SHA = "b" * 40
REPO = "org/tiny-llama"


def fake_hub_cache(root, model_dir, repo=REPO):
    """The layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<sha>/...}. The snapshot of the
    branch 'v2' differs from main's by its llm2vec_config.json, so a test can tell which one was loaded."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    for sha, ref, pooling in ((MAIN_SHA, "main", "mean"), (BRANCH_SHA, "v2", "last_token")):
        snapshot = repo_dir / "snapshots" / sha
        shutil.copytree(model_dir, snapshot)
        (snapshot / "llm2vec_config.json").write_text(json.dumps({"pooling_mode": pooling}))
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(sha)
    return root


@pytest.fixture(scope="module")
def hub_cache(llama_dir, tmp_path_factory):
    return fake_hub_cache(tmp_path_factory.mktemp("hub"), llama_dir)


def load(name, **kw):
    kw.setdefault("dtype", torch.float32)
    return LLM2Vec.from_pretrained(name, **kw)


# ---------------------------------------------------------------------------------------------- hub cache


def test_hub_id_from_cache_dir_at_main_a_branch_and_a_commit(hub_cache, llama_dir):
    main = load(REPO, cache_dir=str(hub_cache))
    assert main.pooling_mode == "mean"
    assert main.config._name_or_path == REPO  # prompt templates are keyed on the hub name, not the cache path
    assert load(REPO, cache_dir=str(hub_cache), revision="v2").pooling_mode == "last_token"
    assert load(REPO, cache_dir=str(hub_cache), revision=BRANCH_SHA).pooling_mode == "last_token"
    # token and local_files_only are accepted (nothing is downloaded either way) and never reach transformers.
    same = load(REPO, cache_dir=str(hub_cache), token="unused", local_files_only=False)
    assert torch.equal(encode(same, TEXTS), encode(main, TEXTS))


def test_hub_id_from_hf_home_like_automodel(hub_cache, tmp_path):
    """HF_HOME (read when huggingface_hub is imported) is honoured as AutoModel honours it: a fresh process."""
    home = tmp_path / "home"
    shutil.copytree(hub_cache, home / "hub", symlinks=True)
    script = (
        "import torch\n"
        "from transformers import AutoModel\n"
        "from llm2vec_fast import LLM2Vec\n"
        f"ours = LLM2Vec.from_pretrained({REPO!r}, dtype=torch.float32, revision='v2')\n"
        f"theirs = AutoModel.from_pretrained({REPO!r}, revision='v2', local_files_only=True)\n"
        "weight = ours.get_input_embeddings().weight\n"
        "assert torch.equal(weight, theirs.get_input_embeddings().weight)\n"
        "print(ours.pooling_mode)\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("last_token")


def test_uncached_id_names_the_download_command(hub_cache):
    with pytest.raises(FileNotFoundError) as error:
        load("org/not-cached", cache_dir=str(hub_cache), revision="v9")
    message = str(error.value)
    assert f"hf download org/not-cached --revision v9 --cache-dir {hub_cache}" in message
    assert "--local-dir DIR" in message and "never downloads" in message
    with pytest.raises(FileNotFoundError, match="at revision 'v9'"):
        load(REPO, cache_dir=str(hub_cache), revision="v9")  # cached, but not at that revision


def test_adapter_id_resolves_from_the_same_cache(hub_cache, llama_dir, tmp_path):
    from test_encoder import make_adapter

    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    fake_hub_cache_adapter = hub_cache / "models--org--tiny-adapter"
    shutil.copytree(adapter, fake_hub_cache_adapter / "snapshots" / MAIN_SHA)
    (fake_hub_cache_adapter / "refs").mkdir()
    (fake_hub_cache_adapter / "refs" / "main").write_text(MAIN_SHA)
    by_id = load(REPO, peft_model_name_or_path="org/tiny-adapter", cache_dir=str(hub_cache))
    by_path = load(llama_dir, peft_model_name_or_path=adapter)
    torch.testing.assert_close(encode(by_id, TEXTS), encode(by_path, TEXTS))


def test_subfolder_of_a_directory(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "repo" / "encoder")
    model = load(str(tmp_path / "repo"), subfolder="encoder")
    assert torch.equal(encode(model, TEXTS), encode(load(llama_dir), TEXTS))
    with pytest.raises(FileNotFoundError, match="no subfolder 'missing'"):
        load(str(tmp_path / "repo"), subfolder="missing")


# ------------------------------------------------------------------------------------ overridden arguments


def our_warnings(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def test_torch_dtype_is_the_old_name_of_dtype(llama_dir):
    assert load(llama_dir, dtype=None, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert load(llama_dir, torch_dtype=torch.float32).dtype == torch.float32  # same value twice: fine
    with pytest.raises(ValueError, match="torch_dtype is the old name of dtype"):
        load(llama_dir, dtype=torch.float32, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("value, warned", [("sdpa", False), ("flash_attention_2", False), (None, False),
                                           ("eager", True), ("flex_attention", True)])
def test_attn_implementation_is_named_when_replaced(llama_dir, value, warned):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = load(llama_dir, attn_implementation=value)
    assert bool(our_warnings(record, f"attn_implementation={value!r} is not used")) == warned
    assert model.model.config._attn_implementation == "llm2vec_fast"


def test_trust_remote_code_is_named(llama_dir):
    with pytest.warns(UserWarning, match="trust_remote_code=True is not used"):
        load(llama_dir, trust_remote_code=True)


def test_device_map_is_honoured_and_a_spread_one_is_named(llama_dir):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = load(llama_dir, device_map="cpu")
    assert model.device.type == "cpu" and not our_warnings(record, "device_map")

    class Spread:
        hf_device_map = {"layers.0": 0, "layers.1": 1}

    with pytest.warns(UserWarning, match=r"device_map placed the model on 2 devices \(0, 1\)"):
        _warn_if_spread(Spread())


def test_our_peft_wraps_raise_no_deprecation_warning(llama_dir, tmp_path):
    """PEFT reads the deprecated `is_gradient_checkpointing` when it wraps a model; our wraps (an adapter load, a
    training run's LoRA) must not surface that FutureWarning to the user."""
    from transformers import AutoModel

    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.model import add_lora
    from test_encoder import make_adapter

    adapter = make_adapter(llama_dir, str(tmp_path / "adapter"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        LLM2Vec.from_pretrained(llama_dir, peft_model_name_or_path=adapter, dtype=torch.float32)
        add_lora(AutoModel.from_pretrained(llama_dir, dtype=torch.float32),
                 TrainConfig(model=llama_dir, data="unused.txt", output="unused", gradient_checkpointing=True))
    assert not [w for w in record if issubclass(w.category, FutureWarning)], [str(w.message) for w in record]
