"""Finding and loading models, tokenizers, adapters and `llm2vec_config.json`, offline.

Layouts understood (those of the llm2vec reference and its released checkpoints):
- a plain model directory (config.json + weights + tokenizer files);
- an adapter directory whose config.json is the base model's config and which holds `adapter_config.json` +
  adapter weights but no base weights (the released `LLM2Vec-*-mntp` layout): the base named by the adapter
  config is loaded (it must be available locally), the adapter applied and merged;
- a model directory that holds both base weights and adapter files: the adapter is applied and merged;
- the name of the embedded default model (see default_model.py).
"""

from __future__ import annotations

import json
import os
import tempfile

from .default_model import default_model_dir, is_default_model_name

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LLM2VEC_CONFIG = "llm2vec_config.json"
ENCODER_ARGS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")


def resolve_directory(name_or_path: str, what: str = "model") -> str:
    """A local directory for `name_or_path`: the embedded default, a directory, or a model in the local HF cache."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path or a model name, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if is_default_model_name(name_or_path):
        return default_model_dir()
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise ValueError(f"{what} path {name_or_path!r} is a file; pass the directory that holds config.json.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is neither a local directory nor in the local Hugging Face cache, and "
            f"llm2vec-fast never downloads at run time. Download it once (e.g. `huggingface-cli download "
            f"{name_or_path} --local-dir DIR`) and pass DIR, or use 'smollm2-135m' for the embedded model."
        ) from None


def has_weights(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f)) for f in WEIGHT_FILES)


def is_adapter_directory(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def check_model_directory(directory: str) -> None:
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"{directory!r} has no config.json, so it is not a model directory. Pass the directory that "
            f"save_pretrained / LLM2Vec.save wrote.")
    if not has_weights(directory) and not is_adapter_directory(directory):
        raise FileNotFoundError(
            f"{directory!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)}) and no adapter: the "
            f"download or save looks incomplete. Re-save or re-download the model.")


def adapter_base_name(adapter_dir: str) -> str | None:
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        return json.load(f).get("base_model_name_or_path")


def weights_only_view(directory: str) -> tempfile.TemporaryDirectory:
    """A temporary directory of links to `directory`'s files minus the adapter files.

    transformers loads an adapter it finds beside the weights on its own (and, without base weights, fetches the
    base named in the adapter config from the hub); we load and merge adapters ourselves, explicitly.
    """
    view = tempfile.TemporaryDirectory(prefix="llm2vec_fast_base_")
    for name in os.listdir(directory):
        if name == ADAPTER_CONFIG or name in ADAPTER_WEIGHTS:
            continue
        os.symlink(os.path.abspath(os.path.join(directory, name)), os.path.join(view.name, name))
    return view


def read_llm2vec_config(directory: str | None) -> dict:
    if directory is None:
        return {}
    path = os.path.join(directory, LLM2VEC_CONFIG)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    unknown = set(config) - set(ENCODER_ARGS)
    if unknown:
        raise ValueError(f"{path} has unknown keys {sorted(unknown)}; expected a subset of {list(ENCODER_ARGS)}.")
    return config


def apply_adapter(model, adapter_dir: str, merge: bool):
    """Load the PEFT adapter in `adapter_dir` onto `model`; merge it into the weights if asked."""
    from peft import PeftModel

    if not is_adapter_directory(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir!r} has no {ADAPTER_CONFIG}: it is not a PEFT adapter directory.")
    try:
        wrapped = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(
            f"the adapter in {adapter_dir!r} does not fit the base model {model.config._name_or_path!r} "
            f"({type(model).__name__}, hidden size {model.config.hidden_size}): {str(error)[:500]}. Load the base "
            f"model the adapter was trained on (its adapter_config.json names "
            f"{adapter_base_name(adapter_dir)!r}).") from error
    _check_adapter_loaded(wrapped, adapter_dir)
    return wrapped.merge_and_unload() if merge else wrapped


def _check_adapter_loaded(wrapped, adapter_dir: str) -> None:
    # PEFT only warns when target modules are missing from the base; a silently ignored adapter would produce
    # base-model embeddings, so count the LoRA layers actually injected.
    injected = sum(1 for name, _ in wrapped.named_modules() if name.endswith("lora_A"))
    if injected == 0:
        raise ValueError(
            f"the adapter in {adapter_dir!r} matched no module of the base model: it was trained on another "
            f"architecture. Load the base model it was trained on ({adapter_base_name(adapter_dir)!r}).")
