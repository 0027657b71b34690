"""The output directory of a training run: what is refused, what belongs to us, and what --overwrite removes.

A directory belongs to a training run once it holds RUN_CONFIG (written at the start of every run) or a
checkpoints/ folder. Training refuses an --output that is, or lies inside, the model it starts from, one that
holds a model or other files it did not write, and one that holds a run unless --resume or --overwrite says what
to do with it. --overwrite removes only the files training writes: the checkpoints, the log, RUN_CONFIG,
OUTPUT_LIST and the files OUTPUT_LIST names.

One writer per output: every process of a run holds an OutputLock (output_lock.py) on --output from before its
checks until it returns, so a second run into the directory is refused, naming the holder. The lock files are
ours and count as nothing in the directory's listing.

A run records in INPUTS what it trains on when it starts: the sha256 of the data file and of every file of the
--model directory (and of the base model an adapter directory names) and of the --peft-model directory. --resume
refuses a run whose inputs changed since, naming what changed: resuming would mix two trainings.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading

from ..default_model import is_default_model_name
from ..errors import UserError
from ..loading import resolve_directory
from ..files import is_plain_name, remove_entry, remove_orphans, write_atomic
from ..output_lock import LOCK_FILE, OutputLock
from ..settings import Ranks

RUN_CONFIG = "train_config.json"
INFERENCE_CONFIG = "llm2vec_config.json"  # the encoder defaults a trained model is loaded with
OUTPUT_LIST = "train_output.json"  # the names of the files the final save moved into the directory
INPUTS = "train_inputs.json"  # the sha256 of the data and model files the run started with
INPUTS_VERSION = 1
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
    entries = listing(output)
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


def listing(output: str) -> list[str]:
    """The names in directory `output` (none if it is absent), without the run locks (output_lock.py)."""
    if not os.path.isdir(output):
        return []
    return sorted(name for name in os.listdir(output) if not LOCK_FILE.fullmatch(name))


# The locks this process holds: (real path of the output, thread) -> [lock, holders]. train() inside the CLI's hold
# re-enters it; another thread of the process is another writer, refused like another process (a flock belongs to
# its open file, so a second open of the lock file conflicts with the first).
_HELD: dict[tuple[str, int], list] = {}


@contextlib.contextmanager
def hold_output(config, resume: bool, overwrite: bool):
    """Hold this process's lock on config.output (creating the directory) while the body runs, after
    `check_output`; a directory another run holds is refused with a UserError naming the holder. Re-entrant in
    one thread. A directory that cannot be ours (a file, a model, foreign files) is refused before anything is
    created in it; one that holds a run is locked first, so that a run still writing there is named as such."""
    output = config.output
    if not (os.path.isdir(output) and holds_run(output)):
        check_output(config, resume, overwrite)
    key = (os.path.realpath(output), threading.get_ident())
    held = _HELD.get(key)
    if held is None:
        os.makedirs(output, exist_ok=True)
        held = _HELD[key] = [OutputLock(output, Ranks.from_env().rank, "llm2vec-fast train"), 0]
        try:
            held[0].acquire()
        except BaseException:
            del _HELD[key]
            raise
    held[1] += 1
    try:
        check_output(config, resume, overwrite)
        yield
    finally:
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            held[0].release()


def holds_run(output: str) -> bool:
    """True when `output` holds a training run: its RUN_CONFIG file or its checkpoints directory."""
    return os.path.isfile(os.path.join(output, RUN_CONFIG)) or os.path.isdir(os.path.join(output, CHECKPOINTS))


def stored_config(output: str) -> dict | None:
    """The options RUN_CONFIG records, or None when there is none."""
    return _stored_object(os.path.join(output, RUN_CONFIG), "does not hold training options (not the JSON object "
                                                            "training wrote); start the run afresh with --overwrite.")


def _stored_object(path: str, damaged: str) -> dict | None:
    """The JSON object a run wrote at `path`, None when there is no such file, or a UserError "<path> <damaged>"
    when it is not a readable JSON object (cut short, edited, nested too deeply)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            stored = json.load(f)
    except (ValueError, RecursionError):
        stored = None
    if not isinstance(stored, dict):
        raise UserError(f"{path} {damaged}")
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
    names = {CHECKPOINTS, RUN_CONFIG, OUTPUT_LIST, INPUTS, log_file, *STAGE_FILES}
    path = os.path.join(output, OUTPUT_LIST)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                listed = json.load(f).get("files", [])
        except (ValueError, AttributeError):
            listed = []  # a damaged list names nothing; foreign files must never be removed on its word
        names.update(name for name in listed if is_plain_name(name))
    return sorted(name for name in names if os.path.lexists(os.path.join(output, name)))


def input_fingerprint(config) -> dict:
    """The sha256 of what the run `config` trains on: the data file, every file of the --model directory (and of
    the base model that an adapter directory without weights names), and of the --peft-model directory. Hashes
    are cached (encode_job/fingerprint.py), so a second call is cheap. A model that cannot be resolved is left
    out: loading it reports that with its own error."""
    from ..encode_job.fingerprint import directory_sha256s, file_sha256

    fingerprint = {"version": INPUTS_VERSION, "data_sha256": file_sha256(config.data)}
    for key, name in (("model", config.model), ("peft_model", config.peft_model)):
        directory = _resolved(name, key)
        if directory is None:
            continue
        fingerprint[f"{key}_files"] = directory_sha256s(directory)
        base = _adapter_base(directory) if key == "model" else None
        if base is not None:
            fingerprint["base_model_files"] = directory_sha256s(base)
    return fingerprint


def stored_inputs(output: str) -> dict | None:
    """The fingerprint INPUTS records in `output`, or None when it has none (a run of an older version)."""
    return _stored_object(os.path.join(output, INPUTS), "is damaged (not the JSON object training wrote); the inputs "
                          "of the run cannot be checked. Start the run afresh with --overwrite, or train into a new "
                          "--output.")


def record_inputs(output: str, fingerprint: dict) -> None:
    """Write `fingerprint` to INPUTS in `output` (rank 0, when a run starts)."""
    write_atomic(os.path.join(output, INPUTS), (json.dumps(fingerprint, indent=1, sort_keys=True) + "\n").encode())


def check_same_inputs(config, fingerprint: dict | None = None) -> dict:
    """For --resume: refuse (UserError, naming what changed and the fix) a run whose data or model files differ
    from those recorded when it started; returns the current fingerprint. A run that recorded none (an older
    version) cannot be checked: that is said on stderr, once (rank 0)."""
    now = input_fingerprint(config) if fingerprint is None else fingerprint
    stored = stored_inputs(config.output)
    if stored is None:
        if os.path.isdir(os.path.join(config.output, CHECKPOINTS)) and Ranks.from_env().is_main:
            print(f"--resume: {config.output} records no {INPUTS} (a run of an older llm2vec-fast); its data and "
                  f"model files are not checked against the ones it started with", file=sys.stderr)
        return now
    changes = input_changes(stored, now, config)
    if changes:
        raise UserError(f"cannot resume the run in {config.output}: since it started, {'; '.join(changes)}. "
                        f"Resuming would mix two trainings: restore the original files, or train into a new "
                        f"--output (or start over here with --overwrite).")
    return now


def input_changes(stored: dict, now: dict, config) -> list[str]:
    """What differs between two input fingerprints, one phrase each ([] when they agree)."""
    what = {"data_sha256": f"the training data {config.data} changed (its sha256 differs)",
            "model_files": f"the --model files ({config.model})",
            "base_model_files": "the files of the base model that the --model adapter names",
            "peft_model_files": f"the --peft-model files ({config.peft_model})"}
    changes = []
    for key in sorted(set(stored) | set(now)):
        old, new = stored.get(key), now.get(key)
        if old == new:
            continue
        if key in what and key != "data_sha256" and isinstance(old, dict) and isinstance(new, dict):
            names = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
            changes.append(f"{what[key]} changed: {', '.join(names)}")
        elif key in what:
            changes.append(what[key] if key == "data_sha256" else f"{what[key]} changed")
        else:
            changes.append(f"{key} differs")
    return changes


def _resolved(name: str, what: str) -> str | None:
    if not name:
        return None
    try:
        return resolve_directory(name, what)
    except (OSError, ValueError, TypeError, RuntimeError, UserError):
        return None


def _adapter_base(directory: str) -> str | None:
    """The base model directory of an adapter directory that holds no weights itself, else None."""
    from ..loading import adapter_base_name, has_weights, is_adapter_directory

    if not is_adapter_directory(directory) or has_weights(directory):
        return None
    try:
        base = adapter_base_name(directory)
    except (OSError, ValueError, TypeError):
        return None
    return _resolved(base, "base model") if isinstance(base, str) else None


def save_max_length(output: str, max_length: int) -> None:
    """Add `max_length` to the INFERENCE_CONFIG a finished run saved in `output` (rewritten atomically): what
    `train --save-max-length` asks for. A stage saves its inference defaults without it: it limited the training
    texts (RUN_CONFIG records it), and as an inference default --max-length 32 would cut every later encode."""
    path = os.path.join(output, INFERENCE_CONFIG)
    with open(path) as f:
        config = json.load(f)
    write_atomic(path, (json.dumps({**config, "max_length": max_length}, indent=4) + "\n").encode())


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
