"""Finding and loading models, tokenizers, adapters and `llm2vec_config.json`, offline.

Layouts understood (those of the llm2vec reference and its released checkpoints):
- a plain model directory (config.json + weights + tokenizer files);
- an adapter directory whose config.json is the base model's config and which holds `adapter_config.json` +
  adapter weights but no base weights (the released `LLM2Vec-*-mntp` layout): the base named by the adapter
  config is loaded (it must be available locally), the adapter applied and merged;
- a model directory that holds both base weights and adapter files: the adapter is applied and merged;
- the name of the embedded default model (see default_model.py);
- a sentence-transformers directory (modules.json: Transformer, Pooling, Dense, Normalize; see st_directory.py):
  its pooling, head, max_seq_length, prompts and attention direction become the encoder's.
"""

from __future__ import annotations

import json
import os
import pickle
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
# transformers' model_max_length for a tokenizer that states none (VERY_LARGE_INTEGER).
_NO_LIMIT = int(1e30)


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
    try:
        if is_adapter_directory(directory):
            with weights_only_view(directory) as view:
                model, info = auto_model.from_pretrained(view, output_loading_info=True, **kwargs, **NO_REMOTE_CODE)
        else:
            model, info = auto_model.from_pretrained(directory, output_loading_info=True, **kwargs, **NO_REMOTE_CODE)
    except pickle.UnpicklingError:
        # torch's weights_only load refused a pickled object that is not a tensor. Its message suggests
        # weights_only=False, i.e. running the file's code: we never do, and say so instead.
        raise ValueError(
            f"the .bin weights in {directory!r} hold pickled objects other than tensors, so they were not loaded "
            f"(unpickling them could run code). Use the model's safetensors weights, or convert the checkpoint "
            f"with a tool you trust.") from None
    missing = sorted(info.get("missing_keys", ()))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(_DROPPED_HEAD_PREFIXES))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the weights in {directory!r} do not match its config.json: "
            f"{describe_keys(missing=missing, unexpected=unexpected, mismatched=mismatched)}. Loading would run "
            f"with random or absent parts. Re-download or re-save the model, or fix config.json (e.g. "
            f"num_hidden_layers) so it describes these weights.")
    return model


def describe_keys(**groups: list) -> str:
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
    """Encoder defaults from `directory`'s llm2vec_config.json ({} without one; a sentence-transformers directory
    without one: the defaults its modules state), each value checked."""
    if directory is None:
        return {}
    path = os.path.join(directory, LLM2VEC_CONFIG)
    if not os.path.isfile(path):
        from .st_directory import is_st_directory, read_st_directory

        # A sentence-transformers directory states the same defaults in its own files.
        return st_encoder_args(read_st_directory(directory)) if is_st_directory(directory) else {}
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


# ------------------------------------------------------------------------------------------------ an encoder


def load_encoder(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                 enable_bidirectional: bool | None = None, **kwargs):
    """The body of `LLM2Vec.from_pretrained` (see its docstring): resolve the directories (never downloading),
    apply the dtype policy (`precision`), load the weights, apply the adapters, load the tokenizer, patch the
    model, and read the encoder arguments from kwargs, then llm2vec_config.json (or, for a sentence-transformers
    directory, from its modules). enable_bidirectional None: bidirectional, except for a sentence-transformers
    directory, which is bidirectional only when its model config says so (is_causal: false or
    use_bidirectional_attention: true)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from .adapters import apply_adapter
    from .modeling import check_supported, patch
    from .precision import resolve_dtype_argument
    from .st_directory import is_bidirectional_config, is_st_directory, read_st_directory

    if "batch_size" in kwargs:
        raise TypeError("batch_size is an argument of encode(), not of from_pretrained(); pass it to encode(), "
                        "or max_batch_tokens= here for a default token budget.")
    encoder_args = {k: v for k in ENCODER_ARGS if (v := kwargs.pop(k, None)) is not None}
    runtime_args = {k: kwargs.pop(k) for k in ("engine", "max_batch_tokens", "matmul_dtype", "long_input",
                                               "chunk_overlap") if k in kwargs}
    hub, kwargs = split_loading_kwargs(kwargs)
    cache = {"cache_dir": hub.get("cache_dir")}

    base_dir = resolve_directory(base_model_name_or_path, "base model", revision=hub.get("revision"),
                                 subfolder=hub.get("subfolder"), **cache)
    st_description = None
    if is_st_directory(base_dir):
        st_description = read_st_directory(base_dir)
        base_dir = st_description.transformer_dir
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

    if enable_bidirectional is None:
        enable_bidirectional = is_bidirectional_config(base_config) if st_description is not None else True
    patch(model, bidirectional=enable_bidirectional)
    if st_description is not None:
        config = st_encoder_args(st_description)
    else:
        config = read_llm2vec_config(adapter_dir if adapter_dir is not None else base_dir)
    config.update(encoder_args)
    encoder = cls(model=model, tokenizer=tokenizer, **config, **runtime_args)
    if st_description is not None:
        encoder.use_sentence_transformers(st_description)
    return encoder


def st_encoder_args(description) -> dict:
    """Encoder arguments of a sentence-transformers directory (an st_directory.STDirectory): its pooling (the prompt
    excluded from pooling when include_prompt is false) and its token limit, max_seq_length, else the tokenizer's
    model_max_length capped at the model's max_position_embeddings, as sentence-transformers computes it.
    doc_max_length is the same limit: sentence-transformers has no word-based shortening."""
    max_length = description.max_seq_length
    if max_length is None:
        folder = description.transformer_dir
        tokenizer_path = os.path.join(folder, "tokenizer_config.json")
        tokenizer_config = read_json_object(tokenizer_path) if os.path.isfile(tokenizer_path) else {}
        limit = tokenizer_config.get("model_max_length")
        max_length = int(limit) if isinstance(limit, (int, float)) and limit >= 1 else _NO_LIMIT
        positions = read_json_object(os.path.join(folder, "config.json")).get("max_position_embeddings")
        if type(positions) is int and positions > 0:
            max_length = min(max_length, positions)
    return {"pooling_mode": description.pooling_mode, "skip_instruction": not description.include_prompt,
            "max_length": max_length, "doc_max_length": max_length}


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
