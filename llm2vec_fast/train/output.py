"""The output directory of a training run: what is refused, what belongs to us, and what --overwrite removes.

A directory belongs to a training run once it holds RUN_CONFIG (written at the start of every run) or a
checkpoints/ folder. Training refuses an --output that is, or lies inside, the model it starts from, one that
holds a model or other files it did not write, and one that holds a run unless --resume or --overwrite says what
to do with it. --overwrite removes only the files training writes: the checkpoints, the log, RUN_CONFIG,
OUTPUT_LIST and the files OUTPUT_LIST names.
"""

from __future__ import annotations

import json
import os

from ..default_model import is_default_model_name
from ..errors import UserError
from ..loading import resolve_directory
from ..files import is_plain_name, remove_entry, remove_orphans, write_atomic

RUN_CONFIG = "train_config.json"
INFERENCE_CONFIG = "llm2vec_config.json"  # the encoder defaults a trained model is loaded with
# Keys of INFERENCE_CONFIG that a contrastive stage's save copies from its training options, but that describe the
# training run rather than the model (RUN_CONFIG keeps them): saved as inference defaults, --max-length 32 would cut
# every later encode of the model to 32 tokens.
TRAINING_LIMITS = ("max_length",)
OUTPUT_LIST = "train_output.json"  # the names of the files the final save moved into the directory
CHECKPOINTS = "checkpoints"
# What a stage's save always writes (also removed by --overwrite when OUTPUT_LIST is absent, e.g. after a kill).
STAGE_FILES = ("adapter_model.safetensors", "adapter_config.json", "llm2vec_config.json")
# Files that make a directory a model someone may still need.
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin")


def check_output(config, resume: bool, overwrite: bool) -> None:
    """Refuse an --output that training must not write to (read-only; every rank may call it)."""
    output = config.output
    if resume and overwrite:
        raise UserError("--resume continues the run in --output and --overwrite replaces it; pass one of them.")
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output!r} is a file; pass a directory.")
    _refuse_model_directory(config, overwrite)
    entries = sorted(os.listdir(output)) if os.path.isdir(output) else []
    if os.path.islink(os.path.join(output, CHECKPOINTS)):
        raise UserError(f"{os.path.join(output, CHECKPOINTS)} is a symlink; training writes checkpoints only into a "
                        f"directory of its own. Remove the link, or choose another --output.")
    if not entries:
        if resume:
            raise UserError(f"--resume: there is no training run in {output!r} to continue; start without --resume.")
        return
    if not holds_run(output):
        models = [name for name in MODEL_FILES if name in entries]
        what = f"a model ({', '.join(models)})" if models else f"files training did not write ({_listing(entries)})"
        raise UserError(f"--output {output!r} holds {what}; training would overwrite them. Choose a new or empty "
                        f"--output directory.")
    if not (resume or overwrite):
        raise UserError(f"--output {output!r} already holds a training run ({_listing(entries)}); pass --resume to "
                        f"continue it, --overwrite to replace it, or choose a new --output directory.")


def holds_run(output: str) -> bool:
    """True when `output` holds a training run: its RUN_CONFIG file or its checkpoints directory."""
    return os.path.isfile(os.path.join(output, RUN_CONFIG)) or os.path.isdir(os.path.join(output, CHECKPOINTS))


def stored_config(output: str) -> dict | None:
    """The options RUN_CONFIG records, or None when there is none."""
    path = os.path.join(output, RUN_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); start the run afresh with --overwrite.") from None
    if not isinstance(stored, dict):
        raise UserError(f"{path} does not hold training options; start the run afresh with --overwrite.")
    return stored


def prepare_output(config, overwrite: bool) -> None:
    """Create --output, remove what --overwrite replaces and what a killed run left under temporary names, and
    record the options (rank 0 only, after `check_output`)."""
    os.makedirs(os.path.join(config.output, CHECKPOINTS), exist_ok=True)
    if overwrite:
        for name in owned_files(config.output, config.log_file):
            remove_entry(os.path.join(config.output, name))
        os.makedirs(os.path.join(config.output, CHECKPOINTS), exist_ok=True)
    remove_orphans(config.output)
    write_atomic(os.path.join(config.output, RUN_CONFIG), (json.dumps(config.to_dict(), indent=2) + "\n").encode())


def owned_files(output: str, log_file: str) -> list[str]:
    """The names in `output` that training wrote (what --overwrite removes); foreign files are never listed."""
    names = {CHECKPOINTS, RUN_CONFIG, OUTPUT_LIST, log_file, *STAGE_FILES}
    path = os.path.join(output, OUTPUT_LIST)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                listed = json.load(f).get("files", [])
        except (ValueError, AttributeError):
            listed = []  # a damaged list names nothing; foreign files must never be removed on its word
        names.update(name for name in listed if is_plain_name(name))
    return sorted(name for name in names if os.path.lexists(os.path.join(output, name)))


def drop_training_limits(output: str) -> None:
    """Remove TRAINING_LIMITS from the INFERENCE_CONFIG a finished run saved in `output` (rewritten atomically;
    nothing to do without the file or the keys), so that the model encodes with the loader's defaults."""
    path = os.path.join(output, INFERENCE_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # no file, or not ours to fix: loading it names the problem
    if not isinstance(config, dict) or not any(key in config for key in TRAINING_LIMITS):
        return
    kept = {key: value for key, value in config.items() if key not in TRAINING_LIMITS}
    write_atomic(path, (json.dumps(kept, indent=4) + "\n").encode())


def record_outputs(output: str, names: list[str]) -> None:
    """Record the names the final save is about to move into `output` (before the move, so a kill during it
    still leaves them listed for --overwrite)."""
    write_atomic(os.path.join(output, OUTPUT_LIST), (json.dumps({"files": sorted(names)}, indent=1) + "\n").encode())


def _refuse_model_directory(config, overwrite: bool) -> None:
    output = os.path.realpath(config.output)
    for flag, name in (("--model", config.model), ("--peft-model", config.peft_model)):
        if not name or not (is_default_model_name(name) or os.path.isdir(name)):
            continue
        model = os.path.realpath(resolve_directory(name, flag[2:]))
        if output == model or output.startswith(model + os.sep):
            where = "is" if output == model else "lies inside"
            raise UserError(f"--output {config.output!r} {where} the {flag} directory {name!r}; training writes its "
                            f"adapter, config and tokenizer there and would overwrite that model. Choose an "
                            f"--output outside it.")
        if overwrite and model.startswith(output + os.sep):
            raise UserError(f"the {flag} directory {name!r} lies inside --output {config.output!r}, which "
                            f"--overwrite would clear; copy the model elsewhere first, or choose another --output.")


def _listing(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(e) for e in entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")
