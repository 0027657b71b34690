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
# Unexpected checkpoint keys that are dropped on purpose: AutoModel is the decoder without its LM head, and a
# causal-LM checkpoint with untied embeddings carries lm_head.weight.
_DROPPED_HEAD_PREFIXES = ("lm_head.",)
_KEYS_SHOWN = 5


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


def read_json_object(path: str) -> dict:
    """The JSON object in `path`, or a ValueError naming the file and what is wrong with it."""
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or delete the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not {json.dumps(value)[:40]}; fix or delete "
                         f"the file.")
    return value


def read_adapter_config(adapter_dir: str) -> dict:
    return read_json_object(os.path.join(adapter_dir, ADAPTER_CONFIG))


def adapter_base_name(adapter_dir: str) -> str | None:
    return read_adapter_config(adapter_dir).get("base_model_name_or_path")


def load_base_model(auto_model, directory: str, **kwargs):
    """`auto_model.from_pretrained(directory)` that refuses checkpoints whose tensors do not match the config.

    transformers initialises missing tensors at random and drops unexpected ones with only a log line, so a
    truncated file or a config with extra layers would otherwise encode with random parts. Adapter files beside
    the weights are left out (see `weights_only_view`); the caller applies them.
    """
    kwargs.pop("output_loading_info", None)
    if is_adapter_directory(directory):
        with weights_only_view(directory) as view:
            model, info = auto_model.from_pretrained(view, output_loading_info=True, **kwargs)
    else:
        model, info = auto_model.from_pretrained(directory, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_DROPPED_HEAD_PREFIXES))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the weights in {directory!r} do not match its config.json: "
            f"{_describe_keys(missing=missing, unexpected=unexpected, mismatched=mismatched)}. Loading would run "
            f"with random or absent parts. Re-download or re-save the model, or fix config.json (e.g. "
            f"num_hidden_layers) so it describes these weights.")
    return model


def _describe_keys(**groups: list) -> str:
    """'2 missing (a, b), 1 unexpected (c)': each non-empty group with its first few keys and its count."""
    parts = []
    for label, keys in groups.items():
        if keys:
            shown = ", ".join(keys[:_KEYS_SHOWN]) + (", ..." if len(keys) > _KEYS_SHOWN else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return ", ".join(parts)


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
    """Encoder defaults from `directory`'s llm2vec_config.json ({} without one), each value checked."""
    if directory is None:
        return {}
    path = os.path.join(directory, LLM2VEC_CONFIG)
    if not os.path.isfile(path):
        return {}
    config = read_json_object(path)
    unknown = set(config) - set(ENCODER_ARGS)
    if unknown:
        raise ValueError(f"{path} has unknown keys {sorted(unknown)}; expected a subset of {list(ENCODER_ARGS)}.")
    for key, value in config.items():
        problem = _encoder_arg_problem(key, value)
        if problem:
            raise ValueError(f"{path}: {key} is {json.dumps(value)}, but {problem}; fix the file or pass {key}= "
                             f"explicitly.")
    return config


def _encoder_arg_problem(key: str, value) -> str | None:
    from .batching import POOLING_MODES

    if key == "pooling_mode" and value not in POOLING_MODES:
        return f"it must be one of {', '.join(POOLING_MODES)}"
    if key in ("max_length", "doc_max_length") and (type(value) is not int or value < 1):
        return "it must be a positive integer"
    if key == "skip_instruction" and not isinstance(value, bool):
        return "it must be true or false"
    return None


def apply_adapter(model, adapter_dir: str, merge: bool):
    """Load the PEFT adapter in `adapter_dir` onto `model`; merge it into the weights if asked."""
    from peft import PeftModel

    if not is_adapter_directory(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir!r} has no {ADAPTER_CONFIG}: it is not a PEFT adapter directory.")
    check_adapter_directory(adapter_dir)
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


def check_adapter_directory(adapter_dir: str) -> None:
    """Refuse an adapter directory whose adapter_config.json is not a JSON object or that holds no weights."""
    read_adapter_config(adapter_dir)
    if not any(os.path.isfile(os.path.join(adapter_dir, name)) for name in ADAPTER_WEIGHTS):
        raise FileNotFoundError(
            f"{adapter_dir!r} has an {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): "
            f"the save or download looks incomplete. Re-save or re-download the adapter.")


def _check_adapter_loaded(wrapped, adapter_dir: str) -> None:
    # PEFT only warns when target modules are missing from the base; a silently ignored adapter would produce
    # base-model embeddings, so count the LoRA layers actually injected.
    injected = sum(1 for name, _ in wrapped.named_modules() if name.endswith("lora_A"))
    if injected == 0:
        raise ValueError(
            f"the adapter in {adapter_dir!r} matched no module of the base model: it was trained on another "
            f"architecture. Load the base model it was trained on ({adapter_base_name(adapter_dir)!r}).")
    # PEFT leaves LoRA weights absent from the file at their initialisation and ignores extra ones (with at most
    # a warning), so compare the file's keys with the tensors of the injected modules.
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(wrapped))
    stored = _adapter_file_keys(adapter_dir)
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise ValueError(
            f"the adapter weights in {adapter_dir!r} do not match the LoRA layers its {ADAPTER_CONFIG} describes: "
            f"{_describe_keys(missing=missing, unexpected=unexpected)}. The adapter would run with "
            f"initialisation values in place of trained ones. Re-save or re-download the adapter.")


def _adapter_file_keys(adapter_dir: str) -> set:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    from peft.utils import load_peft_weights

    return set(load_peft_weights(adapter_dir))
