"""What a model directory must pass before anything in it is loaded: no custom code, and a config that
describes a model of sane size and the weights beside it.

- **No code from a directory.** transformers runs a repository's own Python when a config names it (`auto_map`)
  and `trust_remote_code` allows it; left unset, it asks on the terminal, and an encode reading its corpus from
  stdin would answer with a line of the corpus. Every loader here passes `trust_remote_code=False`
  (`NO_REMOTE_CODE`), and a directory whose configs name custom code is refused first, naming the file.
- **A sane config, checked before allocation.** A missing or absurd size (`hidden_size: 0`, `1e9`, a non-integer
  head count, a NaN `rope_theta`) is named instead of crashing deep in transformers or allocating terabytes, and
  a config that describes a far larger model than its weights hold is refused before the model is built.
"""

from __future__ import annotations

import json
import math
import os

# Passed to every transformers loader: never run code from a model directory, never prompt.
NO_REMOTE_CODE = {"trust_remote_code": False}
# Configs transformers reads through an Auto class, where an `auto_map` would name custom code.
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
# Integer sizes every supported config.json states, with bounds far beyond any released decoder (the largest
# open models have hidden sizes of 16-25k, 128 layers, 128 heads and vocabularies of 256k).
_REQUIRED_SIZES = {"hidden_size": 131_072, "num_hidden_layers": 2_048, "num_attention_heads": 4_096,
                   "vocab_size": 16_777_216}
_OPTIONAL_SIZES = {"num_key_value_heads": 4_096, "intermediate_size": 1_048_576, "head_dim": 16_384}
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
# The weights on disk must hold at least this fraction of the parameters the config implies (at one byte each:
# a lower bound whatever the dtype); far less means the config describes another, larger model.
_MIN_WEIGHT_FRACTION = 0.5


class ModelDirectoryError(ValueError):
    """A model directory we refuse to load; the message names the file, the problem and the fix."""


def refuse_remote_code(directory: str) -> None:
    """Refuse a directory whose configs name custom code (an `auto_map` entry)."""
    for name in _CONFIG_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        config = _read_json(path)
        if isinstance(config, dict) and config.get("auto_map"):
            raise ModelDirectoryError(
                f"{path} names custom code (auto_map: {json.dumps(config['auto_map'])[:120]}). llm2vec-fast never "
                f"runs code from a model directory; use a checkpoint of a supported architecture whose config "
                f"loads with transformers' built-in classes, or remove auto_map if the built-in class is meant.")


def check_config(directory: str) -> dict:
    """The config.json of `directory` after the checks of this module; returns it as a dict."""
    refuse_remote_code(directory)
    path = os.path.join(directory, "config.json")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelDirectoryError(f"{path} must hold a JSON object ({{...}}); fix or re-download the file.")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key, bound in {**_REQUIRED_SIZES, **_OPTIONAL_SIZES}.items():
        if key not in text_config or (key in _OPTIONAL_SIZES and text_config[key] is None):
            if key in _REQUIRED_SIZES:
                raise ModelDirectoryError(f"{path} has no {key!r}: it does not describe a decoder model. "
                                          f"Re-download or re-save the model.")
            continue
        value = text_config[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ModelDirectoryError(f"{path}: {key} is {value!r}; it must be a whole number from 1 to {bound:,}. "
                                      f"Fix config.json so that it describes these weights.")
    heads, kv_heads = text_config["num_attention_heads"], text_config.get("num_key_value_heads") or \
        text_config["num_attention_heads"]
    if heads % kv_heads:
        raise ModelDirectoryError(f"{path}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                                  f"({kv_heads}); fix config.json.")
    if not text_config.get("head_dim") and text_config["hidden_size"] % heads:
        raise ModelDirectoryError(f"{path}: hidden_size ({text_config['hidden_size']}) is not a multiple of "
                                  f"num_attention_heads ({heads}) and no head_dim is given; fix config.json.")
    for key in _POSITIVE_FLOATS:
        value = text_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ModelDirectoryError(f"{path}: {key} is {value!r}; it must be a positive finite number "
                                      f"(it would make every embedding NaN). Fix config.json.")
    return config


def check_weights_fit_config(config: dict, directory: str, weight_bytes: int) -> None:
    """Refuse a config that implies far more parameters than `weight_bytes`, the size of the weights in
    `directory`: transformers would allocate the config's model before reading a single tensor."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    hidden, layers = text_config["hidden_size"], text_config["num_hidden_layers"]
    heads = text_config["num_attention_heads"]
    attention_width = heads * (text_config.get("head_dim") or hidden // heads)
    # A lower bound: the token embedding and each layer's q and o projections (MLP and k/v left out).
    parameters = text_config["vocab_size"] * hidden + layers * 2 * hidden * attention_width
    if parameters * _MIN_WEIGHT_FRACTION > weight_bytes:
        raise ModelDirectoryError(
            f"{os.path.join(directory, 'config.json')} describes a model of at least {parameters:,} parameters, but "
            f"the weights in {directory!r} hold {weight_bytes:,} bytes: the config does not describe these weights "
            f"(or they are incomplete). Fix config.json or re-download the model.")


def weights_size(directory: str, weight_files) -> int:
    """Bytes of the weight files in `directory` (the shards an index names, for a sharded checkpoint)."""
    total = 0
    for name in weight_files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            index = _read_json(path)
            shards = set(index.get("weight_map", {}).values()) if isinstance(index, dict) else set()
            total += sum(os.path.getsize(os.path.join(directory, s)) for s in shards
                         if os.path.isfile(os.path.join(directory, s)))
        else:
            total += os.path.getsize(path)
    return total


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise ModelDirectoryError(f"{path} is not valid JSON ({reason}); fix or re-download the file.") from None
