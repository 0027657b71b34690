"""Reading a sentence-transformers model directory (modules.json) into what our loader needs.

A directory is a pipeline of modules listed in modules.json: a Transformer (the decoder; its folder holds
config.json, the weights, the tokenizer and sentence_bert_config.json), a Pooling, then optional Dense layers and
a Normalize. Both spellings of the module types are understood: `sentence_transformers.models.X` (releases before
6.0, and most published models) and the 6.x module paths. Anything else (a custom module, which sentence-transformers
would import from the repository, a pooling we do not run, tokenization settings we do not reproduce) is refused
with a message naming the module and what to do; nothing is ever imported from the directory.

Only files are read here: the description (`STDirectory`) says which folder holds the decoder, how to pool, what
the head is and which prompts exist; `loading.load_encoder` builds the encoder from it.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

MODULES_FILE = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"

# module kind -> the type strings sentence-transformers writes for it (old spelling first, then 6.x).
_MODULE_TYPES = {
    "Transformer": ("sentence_transformers.models.Transformer",
                    "sentence_transformers.models.Transformer.Transformer",
                    "sentence_transformers.base.modules.transformer.Transformer",
                    "sentence_transformers.base.modules.Transformer"),
    "Pooling": ("sentence_transformers.models.Pooling",
                "sentence_transformers.models.Pooling.Pooling",
                "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
                "sentence_transformers.sentence_transformer.modules.Pooling"),
    "Dense": ("sentence_transformers.models.Dense",
              "sentence_transformers.models.Dense.Dense",
              "sentence_transformers.base.modules.dense.Dense",
              "sentence_transformers.base.modules.Dense"),
    "Normalize": ("sentence_transformers.models.Normalize",
                  "sentence_transformers.models.Normalize.Normalize",
                  "sentence_transformers.base.modules.normalize.Normalize",
                  "sentence_transformers.base.modules.Normalize"),
}
_KIND_OF_TYPE = {t: kind for kind, types in _MODULE_TYPES.items() for t in types}

# sentence-transformers pooling -> our pooling_mode. cls is our bos_token (the first token, which must be the BOS
# the tokenizer adds); max and mean_sqrt_len_tokens are not run by our pooling kernel.
_POOLING = {"mean": "mean", "lasttoken": "last_token", "weightedmean": "weighted_mean", "cls": "bos_token"}
# Pre-6.0 Pooling configs name the mode with one boolean per mode, in this order.
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence_bert_config.json keys that only say how sentence-transformers itself loads the files (dtype, device
# placement): they do not change the embeddings, so they are read past. Every other key must be one we honour.
_IGNORED_TRANSFORMER_KEYS = ("model_args", "model_kwargs", "tokenizer_args", "processor_kwargs", "config_args",
                             "config_kwargs", "cache_dir", "module_output_name", "modality_config",
                             "transformer_task", "backend", "unpad_inputs", "tokenizer_name_or_path")
_KNOWN_TRANSFORMER_KEYS = ("max_seq_length", "do_lower_case") + _IGNORED_TRANSFORMER_KEYS
_SUPPORTED_DIRECTORY = ("a directory whose modules.json lists a Transformer, a Pooling (mean, lasttoken, "
                        "weightedmean or cls), optional Dense layers and an optional Normalize")


@dataclass(frozen=True)
class DenseLayer:
    """One Dense module: y = activation(x @ weight.T + bias)."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    activation: str  # the torch.nn class path sentence-transformers stored, e.g. torch.nn.modules.activation.Tanh


@dataclass(frozen=True)
class STDirectory:
    """What a sentence-transformers directory asks of the encoder.

    transformer_dir: the folder holding the decoder's config.json, weights and tokenizer.
    max_seq_length: the Transformer's token limit from sentence_bert_config.json (None: the tokenizer's
        model_max_length, capped at the model's max_position_embeddings, as sentence-transformers does).
    pooling_mode: ours (mean, last_token, weighted_mean, bos_token); include_prompt: pool over the prompt's tokens.
    dense: the Dense layers in order; normalize: a Normalize module ends the pipeline.
    prompts, default_prompt_name, similarity_fn_name: from config_sentence_transformers.json.
    """

    path: str
    transformer_dir: str
    max_seq_length: Optional[int]
    pooling_mode: str
    include_prompt: bool
    dense: tuple = ()
    normalize: bool = False
    prompts: dict = field(default_factory=dict)
    default_prompt_name: Optional[str] = None
    similarity_fn_name: Optional[str] = None


# The module `llm2vec_fast.evaluation.st_adapter` saves: its directory holds the LLM2Vec layout at the root (what
# LLM2Vec.save writes), and loads as that layout, not as a sentence-transformers pipeline to convert.
_OWN_MODULE = "llm2vec_fast.evaluation.st_adapter.LLM2VecModule"


def is_st_directory(directory: str) -> bool:
    """True when `directory` is a sentence-transformers model directory (it holds modules.json) other than one
    saved by our own st_adapter module."""
    path = os.path.join(directory, MODULES_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            modules = json.load(f)
        return not any(isinstance(m, dict) and m.get("type") == _OWN_MODULE for m in modules)
    except (OSError, ValueError, TypeError):  # unreadable: read_st_directory names the problem
        return True


def read_st_directory(directory: str) -> STDirectory:
    """The description of the sentence-transformers directory `directory`, or a ValueError naming what we cannot
    run and what to do instead."""
    from .loading import read_json_object

    modules = _read_modules(directory)
    kinds = [_module_kind(directory, m) for m in modules]
    _check_order(directory, kinds)
    folders = [_module_folder(directory, m) for m in modules]
    transformer_dir = folders[0]
    max_seq_length = _read_transformer_config(transformer_dir)
    pooling_mode, include_prompt = _read_pooling(folders[1])
    dense = tuple(_read_dense(f) for f, k in zip(folders, kinds) if k == "Dense")
    normalize = kinds[-1] == "Normalize"
    for folder, kind in zip(folders, kinds):
        if kind == "Normalize":
            _check_normalize(folder)
    config_path = os.path.join(directory, ST_CONFIG)
    config = read_json_object(config_path) if os.path.isfile(config_path) else {}
    prompts, default_prompt_name = _read_prompts(config_path, config)
    return STDirectory(path=directory, transformer_dir=transformer_dir, max_seq_length=max_seq_length,
                       pooling_mode=pooling_mode, include_prompt=include_prompt, dense=dense, normalize=normalize,
                       prompts=prompts, default_prompt_name=default_prompt_name,
                       similarity_fn_name=config.get("similarity_fn_name"))


def _read_modules(directory: str) -> list[dict]:
    path = os.path.join(directory, MODULES_FILE)
    with open(path, encoding="utf-8") as f:
        try:
            modules = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); fix or re-download the model.") from None
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{path} must hold a non-empty JSON list of modules ({{\"path\": ..., \"type\": ...}}); "
                         f"fix or re-download the model.")
    return sorted(modules, key=lambda m: m.get("idx", 0)) if all("idx" in m for m in modules) else modules


def _module_kind(directory: str, module: dict) -> str:
    kind = _KIND_OF_TYPE.get(module.get("type"))
    if kind is not None:
        return kind
    name = module.get("type")
    if isinstance(name, str) and not name.startswith("sentence_transformers."):
        raise ValueError(
            f"{directory!r}: modules.json lists the custom module {name!r}, code that sentence-transformers would "
            f"import from the model's repository (trust_remote_code). llm2vec-fast never runs a repository's code; "
            f"it runs {_SUPPORTED_DIRECTORY}. Use SentenceTransformer(..., trust_remote_code=True) for this model.")
    hint = (" (`llm2vec-fast export` writes WordWeights to leave the BOS out of mean pooling: load the model it "
            "exported from instead)") if name == "sentence_transformers.models.WordWeights" else ""
    raise ValueError(
        f"{directory!r}: modules.json lists the module {name!r}, which llm2vec-fast does not run; it runs "
        f"{_SUPPORTED_DIRECTORY}. Use sentence-transformers itself for this model{hint}.")


def _check_order(directory: str, kinds: list[str]) -> None:
    dense_then_normalize = kinds[2:]
    if "Normalize" in dense_then_normalize[:-1]:
        dense_then_normalize = ["misplaced"]
    ok = (len(kinds) >= 2 and kinds[0] == "Transformer" and kinds[1] == "Pooling"
          and all(k in ("Dense", "Normalize") for k in dense_then_normalize))
    if not ok:
        raise ValueError(f"{directory!r}: modules.json lists the modules {kinds}; llm2vec-fast runs "
                         f"{_SUPPORTED_DIRECTORY}, in that order. Use sentence-transformers itself for this model.")


def _module_folder(directory: str, module: dict) -> str:
    relative = module.get("path", "")
    if not isinstance(relative, str) or os.path.isabs(relative) or ".." in relative.replace("\\", "/").split("/"):
        raise ValueError(f"{directory!r}: modules.json names the module folder {relative!r}, which is not a folder "
                         f"inside the model directory; fix modules.json.")
    folder = os.path.join(directory, relative) if relative else directory
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{directory!r}: modules.json names the module folder {relative!r}, which does not "
                                f"exist; the download looks incomplete. Re-download the model.")
    return folder


def _read_transformer_config(folder: str) -> Optional[int]:
    from .loading import read_json_object

    path = os.path.join(folder, TRANSFORMER_CONFIG)
    if not os.path.isfile(path):
        return None
    config = read_json_object(path)
    for key in ("model_args", "model_kwargs", "tokenizer_args", "processor_kwargs", "config_args", "config_kwargs"):
        if isinstance(config.get(key), dict) and config[key].get("trust_remote_code"):
            raise ValueError(
                f"{path} asks for trust_remote_code ({key}), i.e. code from the model's repository. llm2vec-fast never "
                f"runs a repository's code; use SentenceTransformer(..., trust_remote_code=True) for this model.")
    problems = []
    unknown = sorted(set(config) - set(_KNOWN_TRANSFORMER_KEYS))
    if unknown:
        problems.append(f"the settings {unknown}, which llm2vec-fast does not reproduce")
    if config.get("do_lower_case"):
        problems.append("do_lower_case: true (lower-casing the input), which llm2vec-fast does not reproduce")
    if config.get("transformer_task", "feature-extraction") != "feature-extraction":
        problems.append(f"transformer_task {config['transformer_task']!r} (only feature-extraction is an embedder)")
    if config.get("backend", "torch") != "torch":
        problems.append(f"backend {config['backend']!r} (llm2vec-fast runs the PyTorch weights)")
    modality = config.get("modality_config")
    if isinstance(modality, dict) and set(modality) - {"text"}:
        problems.append(f"the input modalities {sorted(modality)} (llm2vec-fast embeds plain text)")
    processing = config.get("processing_kwargs")
    if processing:
        problems.append(f"processing_kwargs {processing!r} (tokenizer call settings llm2vec-fast does not reproduce)")
    if problems:
        raise ValueError(f"{path} has {'; '.join(problems)}. Use sentence-transformers itself for this model, or "
                         f"remove the setting if the model does not need it.")
    max_seq_length = config.get("max_seq_length")
    if max_seq_length is not None and (type(max_seq_length) is not int or max_seq_length < 1):
        raise ValueError(f"{path}: max_seq_length is {json.dumps(max_seq_length)}, not a positive integer; fix the "
                         f"file.")
    return max_seq_length


def _read_pooling(folder: str) -> tuple[str, bool]:
    from .loading import read_json_object

    path = os.path.join(folder, "config.json")
    config = read_json_object(path) if os.path.isfile(path) else {}
    mode = config.get("pooling_mode")
    if mode is None:
        active = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = active if len(active) != 1 else active[0]
        mode = mode or "mean"  # sentence-transformers' default when no mode is set
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, list):
        raise ValueError(f"{path} combines the pooling modes {mode} (their outputs concatenated); llm2vec-fast pools "
                         f"with one mode. Use sentence-transformers itself for this model.")
    if mode not in _POOLING:
        raise ValueError(f"{path}: pooling mode {mode!r} is not run by llm2vec-fast (it runs "
                         f"{', '.join(_POOLING)}). Use sentence-transformers itself for this model.")
    include_prompt = config.get("include_prompt", True)
    if not isinstance(include_prompt, bool):
        raise ValueError(f"{path}: include_prompt is {json.dumps(include_prompt)}, not true or false; fix the file.")
    if not include_prompt and mode in ("weightedmean", "cls"):
        # sentence-transformers keeps the prompt's positions in the weights (weightedmean) and pools the first text
        # token (cls): neither is a range our pooling kernel reads.
        raise ValueError(f"{path}: {mode} pooling with include_prompt: false is not run by llm2vec-fast. Use "
                         f"sentence-transformers itself for this model.")
    return _POOLING[mode], include_prompt


def _read_dense(folder: str) -> DenseLayer:
    from .loading import read_json_object

    path = os.path.join(folder, "config.json")
    config = read_json_object(path)
    problems = []
    if config.get("use_residual"):
        problems.append("use_residual: true")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            problems.append(f"{key} {config[key]!r}")
    if problems:
        raise ValueError(f"{path} has {', '.join(problems)}, which llm2vec-fast's Dense does not run. Use "
                         f"sentence-transformers itself for this model.")
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # its default
    make_activation(activation, path)
    in_features, out_features = config.get("in_features"), config.get("out_features")
    state = _read_weights(folder)
    weight, bias = state.get("linear.weight"), state.get("linear.bias")
    has_bias = config.get("bias", True)
    if weight is None or tuple(weight.shape) != (out_features, in_features) or (has_bias and bias is None) or \
            (bias is not None and tuple(bias.shape) != (out_features,)):
        raise ValueError(f"the Dense weights in {folder!r} do not match its config.json ({in_features} -> "
                         f"{out_features}, bias={has_bias}): found {_shapes(state)}. Re-download the model.")
    return DenseLayer(weight=weight.float(), bias=bias.float() if has_bias else None, activation=activation)


def _shapes(state: dict) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in state.items()) or "no tensors"


def _read_weights(folder: str) -> dict:
    """A module's tensors: model.safetensors, else pytorch_model.bin loaded with torch's weights_only loader (a
    file holding other pickled objects is refused, never unpickled)."""
    safetensors = os.path.join(folder, "model.safetensors")
    if os.path.isfile(safetensors):
        from safetensors.torch import load_file

        return load_file(safetensors)
    pickled = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pickled):
        try:
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"{pickled} holds pickled objects other than tensors, so it was not loaded (unpickling "
                             f"them could run code). Use a model.safetensors file.") from None
    raise FileNotFoundError(f"{folder!r} has no model.safetensors or pytorch_model.bin, which its Dense module "
                            f"needs; the download looks incomplete. Re-download the model.")


def make_activation(name: str, where: str = "the Dense config") -> nn.Module:
    """The activation module a Dense config names: a torch.nn Module class with no arguments (sentence-transformers'
    own rule without trust_remote_code). Any other name is refused (sentence-transformers would fall back to Tanh
    with a warning; we never change the model silently)."""
    module_name, _, class_name = (name or "").rpartition(".")
    cls = None
    if module_name.startswith("torch.nn"):
        import importlib

        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{where}: activation_function {name!r} is not a torch.nn activation module; llm2vec-fast "
                         f"runs only those (e.g. torch.nn.modules.activation.Tanh). Use sentence-transformers itself "
                         f"for this model.")
    return cls()


def _check_normalize(folder: str) -> None:
    from .loading import read_json_object

    path = os.path.join(folder, "config.json")
    config = read_json_object(path) if os.path.isfile(path) else {}
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in (None, "sentence_embedding"):
            raise ValueError(f"{path}: Normalize with {key} {config[key]!r} is not run by llm2vec-fast (it normalizes "
                             f"the sentence embedding). Use sentence-transformers itself for this model.")


def _read_prompts(path: str, config: dict) -> tuple[dict, Optional[str]]:
    model_type = config.get("model_type", "SentenceTransformer")
    if model_type != "SentenceTransformer":
        raise ValueError(f"{path}: model_type is {model_type!r}; llm2vec-fast loads SentenceTransformer (dense "
                         f"embedding) models only.")
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, (str, type(None)))
                                                for k, v in prompts.items()):
        raise ValueError(f"{path}: prompts must map names to strings; fix the file.")
    prompts = {k: v or "" for k, v in prompts.items()}
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}; fix "
                         f"the file.")
    return prompts, default


# ----------------------------------------------------------------------------------------------------- the head


class STHead(nn.Module):
    """The modules after pooling: Dense layers (linear then activation), then an optional L2 normalisation.
    Maps pooled [B, hidden] to embeddings [B, out_features]; runs in float32 whatever the model's dtype (the
    layers are small, and sentence-transformers' own Dense weights are kept in float32 by these directories)."""

    def __init__(self, layers: tuple, normalize: bool, in_features: int):
        super().__init__()
        self.linears = nn.ModuleList()
        self.activations = nn.ModuleList()
        for layer in layers:
            linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=layer.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(layer.weight)
                if layer.bias is not None:
                    linear.bias.copy_(layer.bias)
            self.linears.append(linear)
            self.activations.append(make_activation(layer.activation))
        self.normalize = normalize
        self.out_features = self.linears[-1].out_features if self.linears else in_features

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = pooled
        for linear, activation in zip(self.linears, self.activations):
            x = activation(linear(x.to(linear.weight.dtype)))
        return torch.nn.functional.normalize(x, p=2, dim=-1) if self.normalize else x


def build_head(description: STDirectory, hidden_size: int) -> Optional[STHead]:
    """The encoder head of a directory (None when it has neither Dense layers nor Normalize)."""
    if not description.dense and not description.normalize:
        return None
    if description.dense and description.dense[0].weight.shape[1] != hidden_size:
        raise ValueError(f"{description.path!r}: the first Dense layer takes {description.dense[0].weight.shape[1]} "
                         f"features but the model's hidden size is {hidden_size}; the directory is inconsistent.")
    return STHead(description.dense, description.normalize, hidden_size)


def is_bidirectional_config(config) -> bool:
    """Whether the decoder's config asks for bidirectional attention (is_causal: false, or
    use_bidirectional_attention: true, as EmbeddingGemma's does)."""
    return getattr(config, "is_causal", True) is False or bool(getattr(config, "use_bidirectional_attention", False))
