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
import warnings
from types import SimpleNamespace

from .default_model import default_model_dir, is_default_model_name
from .model_checks import NO_REMOTE_CODE, check_config, check_weights_fit_config, refuse_remote_code, weights_size

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LLM2VEC_CONFIG = "llm2vec_config.json"
ENCODER_ARGS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
# Unexpected checkpoint keys that are dropped on purpose: AutoModel is the decoder without its LM head, and a
# causal-LM checkpoint with untied embeddings carries lm_head.weight.
_DROPPED_HEAD_PREFIXES = ("lm_head.",)
_KEYS_SHOWN = 5


# Hugging Face from_pretrained arguments that say where a hub id's files are (token and local_files_only only
# matter for a download, which never happens). We resolve the id to a local directory ourselves, so they are
# consumed rather than passed on (a subfolder would be applied twice).
HUB_ARGS = ("cache_dir", "revision", "subfolder", "local_files_only", "token")


# attn_implementation values whose substance we keep: "sdpa" is what the padded path calls, and our packed path is
# a varlen flash-attention kernel (flash_attention_2's algorithm, without its package). Any other is replaced.
_ATTENTION_KEPT = (None, "sdpa", "flash_attention_2", "flash_attention_3", "llm2vec_fast")


def split_loading_kwargs(kwargs: dict) -> tuple[dict, dict]:
    """(hub arguments, Hugging Face from_pretrained arguments) of `LLM2Vec.from_pretrained`'s remaining kwargs.

    Arguments we override are named, never dropped silently: `torch_dtype` becomes `dtype` (both with different
    values is an error); an `attn_implementation` we do not run warns; `trust_remote_code=True` warns (only the
    built-in classes of the supported families are loaded); `use_kernels=True` warns (see `load_base_model`).
    """
    kwargs = dict(kwargs)
    hub = {k: kwargs.pop(k) for k in HUB_ARGS if k in kwargs}
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        if kwargs.get("dtype") is not None and kwargs["dtype"] != torch_dtype:
            raise ValueError(f"dtype={kwargs['dtype']!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is "
                             f"the old name of dtype: pass only dtype.")
        kwargs["dtype"] = torch_dtype  # transformers 5 warns on the old name
    attention = kwargs.pop("attn_implementation", None)
    if attention not in _ATTENTION_KEPT:
        warnings.warn(f"attn_implementation={attention!r} is not used: llm2vec-fast runs its own attention (PyTorch "
                      f"SDPA for padded batches, a varlen flash-attention kernel for packed ones), which computes the "
                      f"same attention; drop the argument.", stacklevel=3)
    if kwargs.pop("use_kernels", False):
        warnings.warn("use_kernels=True is not used: llm2vec-fast runs its own kernels and never swaps in Hugging "
                      "Face hub kernels; drop the argument.", stacklevel=3)
    if kwargs.pop("trust_remote_code", False):
        warnings.warn("trust_remote_code=True is not used: llm2vec-fast loads the built-in transformers class of "
                      "the supported families (Llama, Mistral, Qwen2, Gemma), never a repository's own code.",
                      stacklevel=3)
    return hub, kwargs


def resolve_directory(name_or_path: str, what: str = "model", *, cache_dir=None, revision: str | None = None,
                      subfolder: str | None = None) -> str:
    """A local directory for `name_or_path`: the embedded default, a directory, or a model in the local HF cache.

    A hub id is looked up as `AutoModel.from_pretrained` looks it up offline: in `cache_dir`, else the cache that
    HF_HUB_CACHE / HF_HOME name (read when huggingface_hub is imported), at `revision` (a branch, tag or commit;
    default main). subfolder: a folder inside the directory or snapshot. Never downloads: an id that is not cached
    is a FileNotFoundError naming the `hf download` command that fetches it.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a directory path or a model name, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if is_default_model_name(name_or_path):
        return default_model_dir()
    if os.path.isdir(name_or_path):
        return _in_subfolder(name_or_path, subfolder, what)
    if os.path.exists(name_or_path):
        raise ValueError(f"{what} path {name_or_path!r} is a file; pass the directory that holds config.json.")
    if looks_like_path(name_or_path):  # not a hub id: no `hf download` hint
        raise FileNotFoundError(f"{what} {name_or_path!r}: no such directory. Pass the directory that holds the "
                                f"model's config.json (or an adapter's adapter_config.json).")
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        raise FileNotFoundError(_not_cached_message(name_or_path, what, cache_dir, revision)) from None
    return _in_subfolder(snapshot, subfolder, what)


def looks_like_path(name: str) -> bool:
    """True when `name` can only mean a local path: it starts with /, ~ or a dot, holds a backslash or more than
    one slash, or ends with one. A Hugging Face id is "name" or "owner/name" and never looks like this."""
    return (name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or (os.sep != "/" and os.sep in name))


def _in_subfolder(directory: str, subfolder: str | None, what: str) -> str:
    if not subfolder:
        return directory
    path = os.path.join(directory, subfolder)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {directory!r} has no subfolder {subfolder!r}; check subfolder=.")
    return path


def _not_cached_message(name: str, what: str, cache_dir, revision: str | None) -> str:
    from huggingface_hub import constants

    at_revision = f" --revision {revision}" if revision else ""
    into_cache = at_revision + (f" --cache-dir {os.fspath(cache_dir)}" if cache_dir else "")
    where = f"the Hugging Face cache {os.fspath(cache_dir or constants.HF_HUB_CACHE)!r}"
    at = f" at revision {revision!r}" if revision else ""
    return (f"{what} {name!r} is neither a local directory nor in {where}{at}, and llm2vec-fast never downloads at "
            f"run time. Download it once with `hf download {name}{into_cache}` and run again, or into a directory "
            f"(`hf download {name}{at_revision} --local-dir DIR`) and pass DIR; 'smollm2-135m' is the embedded model.")


def has_weights(directory: str) -> bool:
    """True when `directory` holds a weights file (one of WEIGHT_FILES)."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in WEIGHT_FILES)


def is_adapter_directory(directory: str) -> bool:
    """True when `directory` holds a PEFT adapter (an adapter_config.json)."""
    return os.path.isfile(os.path.join(directory, ADAPTER_CONFIG))


def check_model_directory(directory: str) -> None:
    """Raise FileNotFoundError unless `directory` has a config.json and weights or an adapter."""
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
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            reason = "nested too deeply" if isinstance(error, RecursionError) else error
            raise ValueError(f"{path} is not valid JSON ({reason}); fix or delete the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), not {json.dumps(value)[:40]}; fix or delete "
                         f"the file.")
    return value


def read_adapter_config(adapter_dir: str) -> dict:
    """The adapter_config.json of `adapter_dir`, as a dict (ValueError if it is not a JSON object)."""
    return read_json_object(os.path.join(adapter_dir, ADAPTER_CONFIG))


def adapter_base_name(adapter_dir: str) -> str | None:
    """The base model that the adapter in `adapter_dir` names (base_model_name_or_path), or None."""
    return read_adapter_config(adapter_dir).get("base_model_name_or_path")


def load_base_model(auto_model, directory: str, **kwargs):
    """`auto_model.from_pretrained(directory)` that refuses checkpoints whose tensors do not match the config.

    transformers initialises missing tensors at random and drops unexpected ones with only a log line, so a
    truncated file or a config with extra layers would otherwise encode with random parts. Adapter files beside
    the weights are left out (see `weights_only_view`); the caller applies them.

    Hub kernels are off (`use_kernels=False`): transformers >= 5.25 otherwise kernelizes every model it loads
    with Hugging Face's `kernels` when that package is installed, and again on each train()/eval() switch,
    replacing the forwards of layers whose forwards are ours to choose (and fetching kernels from the hub).
    """
    kwargs.pop("output_loading_info", None)
    kwargs["use_kernels"] = False
    check_weights_fit_config(check_config(directory), directory, weights_size(directory, WEIGHT_FILES))
    if is_adapter_directory(directory):
        with weights_only_view(directory) as view:
            model, info = auto_model.from_pretrained(view, output_loading_info=True, **kwargs, **NO_REMOTE_CODE)
    else:
        model, info = auto_model.from_pretrained(directory, output_loading_info=True, **kwargs, **NO_REMOTE_CODE)
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

    from .modeling import peft_wrapping

    if not is_adapter_directory(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir!r} has no {ADAPTER_CONFIG}: it is not a PEFT adapter directory.")
    check_adapter_directory(adapter_dir)
    try:
        with peft_wrapping():
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
    _refuse_non_float_adapter_tensors(adapter_dir)


def _refuse_non_float_adapter_tensors(adapter_dir: str) -> None:
    # PEFT casts whatever the file holds to the layer's dtype: int32 LoRA weights would load as silently wrong
    # values. LoRA weights are floating point; anything else is a broken or foreign file.
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if not os.path.isfile(path):
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); re-save or re-download the "
                         f"adapter.") from None
    wrong = sorted(key for key, dtype in dtypes.items() if dtype not in ("F64", "F32", "F16", "BF16"))
    if wrong:
        raise ValueError(f"{path} holds non-float tensors ({len(wrong)}: {', '.join(wrong[:3])} is "
                         f"{dtypes[wrong[0]]}); LoRA weights are floating point. Re-save or re-download the adapter.")


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


# ------------------------------------------------------------------------------- files the reference can read

# tokenizer_class names of transformers 5 that transformers 4.4x (llm2vec 0.2.3's pin) cannot resolve, and the 4.4x
# class that reads the same tokenizer.json as is (no post-processor rebuilt from flags, unlike the family classes).
_TOKENIZER_CLASS_FOR_REFERENCE = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Adapter config keys that are kept even at their default, so that the file still says what the adapter is.
_ADAPTER_KEYS_KEPT = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "target_modules")
# Recorded by recent peft for information (filled in with the running version when absent); peft 0.12 rejects it
# as an unknown LoraConfig field.
_ADAPTER_METADATA_KEYS = ("peft_version",)


def make_reference_loadable(directory: str, tokenizer=None) -> None:
    """Rewrite what transformers 5 and peft just saved in `directory` so that llm2vec 0.2.3 (transformers 4.43-4.44,
    tokenizers 0.19, peft 0.12) loads it too; current versions load the rewritten files identically.

    tokenizer: the tokenizer that was saved; its `model_input_names` are written down, since 4.4x's generic fast
    tokenizer would otherwise also emit token_type_ids, which the reference passes to a model that refuses them.
    """
    _rewrite_json(directory, "tokenizer_config.json", lambda c: _reference_tokenizer_config(c, tokenizer))
    _rewrite_json(directory, "tokenizer.json", _reference_tokenizer_json)
    _rewrite_json(directory, "config.json", _reference_model_config)
    _rewrite_json(directory, ADAPTER_CONFIG, _reference_adapter_config)


def _rewrite_json(directory: str, name: str, rewrite) -> None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rewrite(content), f, indent=2, ensure_ascii=False)
        f.write("\n")


def _reference_tokenizer_config(config: dict, tokenizer) -> dict:
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = _TOKENIZER_CLASS_FOR_REFERENCE.get(name, name)
    names = getattr(tokenizer, "model_input_names", None)
    if names and "model_input_names" not in config:
        config["model_input_names"] = list(names)
    return config


def _reference_tokenizer_json(content: dict) -> dict:
    # tokenizers >= 0.20 writes BPE merges as [left, right] pairs, which 0.19 cannot parse; the older "left right"
    # strings are read by every version, but are ambiguous (so left alone) when a token holds a space.
    model = content.get("model") or {}
    merges = model.get("merges")
    if model.get("type") == "BPE" and merges and all(isinstance(m, list) and len(m) == 2 for m in merges) \
            and not any(" " in part for m in merges for part in m):
        model["merges"] = [" ".join(m) for m in merges]
    return content


def _reference_model_config(config: dict) -> dict:
    # transformers 5 keeps rope_theta (and any scaling) inside rope_parameters; 4.4x reads only the top-level
    # rope_theta / rope_scaling and would silently use its default theta. transformers 5 reads both spellings.
    # (torch_dtype is not added beside dtype: transformers 5 logs a deprecation warning on reading it, and 4.4x's
    # torch_dtype="auto" falls back to the weights' dtype without it.)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def _reference_adapter_config(config: dict) -> dict:
    # peft 0.12 builds its LoraConfig from every key of the file and fails on any it does not know; the keys added
    # since are new features, so leaving out those at their default changes nothing for any version. A feature
    # actually used stays, and an old peft then names it.
    defaults = _peft_config_defaults(config.get("peft_type"))
    return {k: v for k, v in config.items()
            if k in _ADAPTER_KEYS_KEPT or (k not in _ADAPTER_METADATA_KEYS and not (k in defaults and defaults[k] == v))}


def _peft_config_defaults(peft_type) -> dict:
    import dataclasses

    from peft import PeftConfig

    try:
        config = PeftConfig.from_peft_type(peft_type=peft_type)
    except (KeyError, TypeError, ValueError):
        return {}
    return {f.name: _json_value(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _json_value(value):
    # The file holds JSON (lists, strings for enums); compare defaults in that form.
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------------------------ an encoder


def load_encoder(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                 enable_bidirectional: bool = True, **kwargs):
    """The body of `LLM2Vec.from_pretrained` (see its docstring): resolve the directories (never downloading),
    apply the dtype policy (`precision`), load the weights, apply the adapters, load the tokenizer, patch the
    model, and read the encoder arguments from kwargs, then llm2vec_config.json."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .modeling import check_supported, patch
    from .precision import resolve_dtype_argument

    if "batch_size" in kwargs:
        raise TypeError("batch_size is an argument of encode(), not of from_pretrained(); pass it to encode(), "
                        "or max_batch_tokens= here for a default token budget.")
    encoder_args = {k: v for k in ENCODER_ARGS if (v := kwargs.pop(k, None)) is not None}
    runtime_args = {k: kwargs.pop(k) for k in ("engine", "max_batch_tokens", "matmul_dtype") if k in kwargs}
    hub, kwargs = split_loading_kwargs(kwargs)
    cache = {"cache_dir": hub.get("cache_dir")}

    base_dir = resolve_directory(base_model_name_or_path, "base model", revision=hub.get("revision"),
                                 subfolder=hub.get("subfolder"), **cache)
    check_model_directory(base_dir)
    if is_adapter_directory(base_dir):
        read_adapter_config(base_dir)  # a broken adapter_config.json is named before transformers reads it
    # The architecture first (its own error names the supported ones), then no custom code and sane sizes: all
    # before transformers reads anything.
    check_supported(SimpleNamespace(model_type=read_json_object(os.path.join(base_dir, "config.json")).get(
        "model_type")))
    check_config(base_dir)
    base_config = AutoConfig.from_pretrained(base_dir, **NO_REMOTE_CODE)
    check_supported(base_config)
    kwargs, runtime_args = resolve_dtype_argument(kwargs, runtime_args, base_config)

    weights_dir = base_dir
    if is_adapter_directory(base_dir) and not has_weights(base_dir):
        # The released LLM2Vec layout: base config + adapter; the weights are those of the adapter's base.
        weights_dir = resolve_directory(adapter_base_name(base_dir), "base model named in the adapter config",
                                        revision=read_adapter_config(base_dir).get("revision"), **cache)
    model = load_base_model(AutoModel, weights_dir, **kwargs)
    warn_if_spread(model)
    model.config._name_or_path = _name_of(base_model_name_or_path, base_dir)
    if is_adapter_directory(base_dir):
        model = apply_adapter(model, base_dir, merge=True)

    adapter_dir = None
    if peft_model_name_or_path is not None:
        adapter_dir = resolve_directory(peft_model_name_or_path, "adapter", **cache)
        model = apply_adapter(model, adapter_dir, merge=merge_peft)

    tokenizer = _load_tokenizer(AutoTokenizer, base_dir, weights_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    patch(model, bidirectional=enable_bidirectional)
    config = read_llm2vec_config(adapter_dir if adapter_dir is not None else base_dir)
    config.update(encoder_args)
    return cls(model=model, tokenizer=tokenizer, **config, **runtime_args)


def warn_if_spread(model) -> None:
    """Warn when a device_map spread the model: it is honoured at load, but encode runs the whole model on one
    device and moves it there."""
    devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(devices) > 1:
        warnings.warn(f"device_map placed the model on {len(devices)} devices ({', '.join(devices)}); "
                      f"encode() runs the whole model on one device and moves it there (encode(device=...)). "
                      f"For several GPUs, run one process per GPU instead.", stacklevel=4)


def _name_of(requested, directory: str) -> str:
    # Prompt templates are keyed on the hub name; keep a name the user gave rather than a cache path.
    requested = os.fspath(requested)
    return requested if not os.path.isdir(requested) else directory


def _load_tokenizer(auto_tokenizer, *directories):
    errors = []
    for directory in dict.fromkeys(directories):
        refuse_remote_code(directory)
        try:
            return auto_tokenizer.from_pretrained(directory, **NO_REMOTE_CODE)
        except (OSError, ValueError, TypeError) as error:
            errors.append(f"{directory}: {error}")
    raise FileNotFoundError("no tokenizer could be loaded: " + "; ".join(errors))
