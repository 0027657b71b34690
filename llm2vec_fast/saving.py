"""Writing an encoder to a directory: model or adapter, tokenizer, llm2vec_config.json, never half of it.

The files go into a staging directory beside the destination and are renamed into place one by one (each rename
atomic; a symlink planted at a destination is replaced, never written through). A save records the files it
wrote (`SAVE_RECORD`); the next save removes those of them it does not write again (an adapter beside new merged
weights, weights beside a new adapter, an llm2vec_config.json with save_config=False) and never removes a file it
did not write: such a file that would change what the directory loads as makes the save refuse, before anything
moves. What is written is also loadable by llm2vec 0.2.3 and its transformers 4.4x
(`reference_files.make_reference_loadable`).
"""

from __future__ import annotations

import json
import os
import shutil

from .files import recorded_names, staging_beside
from .loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENCODER_ARGS, LLM2VEC_CONFIG, WEIGHT_FILES
from .reference_files import make_reference_loadable

# Files a save writes whose presence changes what a directory loads as: a stale one left from an earlier save
# (an adapter beside merged weights, weights beside a new adapter) is removed. Anything else is left alone.
_SAVE_MANAGED = (*WEIGHT_FILES, ADAPTER_CONFIG, *ADAPTER_WEIGHTS, LLM2VEC_CONFIG)
_SHARD_SUFFIXES = (".safetensors", ".bin")
# Written by PEFT's save_pretrained as a model card; a README the user keeps in the directory wins.
_KEEP_EXISTING = ("README.md",)
# The files the last save into a directory wrote (JSON list of names): what the next save may remove.
SAVE_RECORD = ".llm2vec-fast-save.json"
# transformers and PEFT read safetensors first: a .bin of the user's beside safetensors we write changes nothing.
_BIN_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def save_encoder(encoder, output_path, merge_before_save: bool = False, save_config: bool = True,
                 model_kwargs: dict | None = None) -> None:
    """Write `encoder` (an LLM2Vec) to `output_path`; see `LLM2Vec.save`. model_kwargs go to the wrapped model's
    save_pretrained (max_shard_size, state_dict, ...)."""
    from peft import PeftModel

    if merge_before_save and isinstance(encoder.model, PeftModel):
        encoder.model = encoder.model.merge_and_unload()
    output_path = os.fspath(output_path)
    if os.path.lexists(output_path) and not os.path.isdir(output_path):
        raise FileExistsError(f"{output_path!r} exists and is not a directory; pass a directory to save into.")
    staging = staging_beside(output_path, "saving")
    try:
        encoder.model.save_pretrained(staging, **(model_kwargs or {}))
        if isinstance(encoder.model, PeftModel):
            # An unmerged adapter is saved with its base's config.json (the released LLM2Vec layout).
            encoder.model.get_base_model().config.save_pretrained(staging)
        encoder.tokenizer.save_pretrained(staging)
        if save_config:
            with open(os.path.join(staging, LLM2VEC_CONFIG), "w") as f:
                json.dump({k: getattr(encoder, k) for k in ENCODER_ARGS}, f, indent=4)
        make_reference_loadable(staging, encoder.tokenizer)
        with open(os.path.join(staging, SAVE_RECORD), "w") as f:
            json.dump(sorted(os.listdir(staging)), f)
        _install_saved_files(staging, output_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install_saved_files(staging: str, output_path: str) -> None:
    """Move a finished save from `staging` into `output_path`, removing stale files an earlier save left."""
    if not os.path.lexists(output_path):
        os.rename(staging, output_path)  # a new directory appears whole
        return
    new = set(os.listdir(staging))
    ours = recorded_names(output_path, SAVE_RECORD)
    stale = [name for name in sorted(os.listdir(output_path)) if name not in new and _is_managed(name)]
    foreign = [name for name in stale if name not in ours and not _harmless_beside(name, new)]
    if foreign:
        raise FileExistsError(
            f"{output_path!r} holds {', '.join(foreign)}, which an earlier save of llm2vec-fast did not write and "
            f"which would change what the directory loads as beside this save's files. Move "
            f"{'it' if len(foreign) == 1 else 'them'} elsewhere, or save into another directory.")
    for name in stale:
        if name in ours:
            os.remove(os.path.join(output_path, name))  # a symlink is removed itself, its target kept
    # The configs last: a directory whose weights are in place before its config says what it is; the record of
    # what this save wrote after everything.
    for name in sorted(new, key=lambda n: (n == SAVE_RECORD, n == LLM2VEC_CONFIG or n == ADAPTER_CONFIG)):
        destination = os.path.join(output_path, name)
        if name in _KEEP_EXISTING and os.path.lexists(destination):
            continue
        if os.path.isdir(destination) and not os.path.islink(destination):
            raise IsADirectoryError(f"cannot save {name} into {output_path!r}: a directory of that name is in the "
                                    f"way. Move it, or save elsewhere.")
        os.replace(os.path.join(staging, name), destination)


def _harmless_beside(name: str, new: set) -> bool:
    """A .bin weights file next to the safetensors this save writes: never read, so never in the way."""
    sharded_bin = name.startswith("pytorch_model-") and name.endswith(".bin")
    return (name in _BIN_FILES or sharded_bin) and any(n in new for n in _SAFETENSORS_FILES)


def _is_managed(name: str) -> bool:
    # Sharded weights: model-00001-of-00004.safetensors, pytorch_model-00001-of-00002.bin.
    sharded = name.startswith(("model-", "pytorch_model-")) and "-of-" in name and name.endswith(_SHARD_SUFFIXES)
    return name in _SAVE_MANAGED or sharded
