"""PEFT adapters: loading one onto a base model, and refusing one that would run with wrong or missing weights.

PEFT initialises LoRA weights absent from the file, ignores extra ones and casts whatever dtype the file holds;
an adapter trained for another architecture can match no module at all. Each of these would encode with
something other than the trained adapter, so each is an error here that names the tensors and the fix.
"""

from __future__ import annotations

import os

from .loading import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, describe_keys, adapter_base_name, is_adapter_directory,
                      read_adapter_config)


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
            f"{describe_keys(missing=missing, unexpected=unexpected)}. The adapter would run with "
            f"initialisation values in place of trained ones. Re-save or re-download the adapter.")


def _adapter_file_keys(adapter_dir: str) -> set:
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS[0])
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return set(f.keys())
    from peft.utils import load_peft_weights

    return set(load_peft_weights(adapter_dir))
