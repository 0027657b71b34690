"""Files llm2vec 0.2.3 can read: what transformers 5 and peft save, rewritten for the reference's stack.

The reference pins transformers 4.43-4.44, tokenizers 0.19 and peft 0.12. `make_reference_loadable` rewrites the
tokenizer config, the tokenizer, the model config and the adapter config a save just wrote so that the reference
loads them; current versions load the rewritten files identically (tests/test_dropin.py checks both).
"""

from __future__ import annotations

import json
import os

from .loading import ADAPTER_CONFIG

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
