"""Checkpoints that can be trusted: nothing is unpickled, and a checkpoint counts only once it is whole.

Layout of `checkpoints/step-N/`:

    adapter_model.safetensors, adapter_config.json   the LoRA weights (peft's layout)
    trainer_state.safetensors                         every tensor of the trainer state: optimizer moments,
                                                      torch CPU/CUDA RNG states, the numpy RNG key
    trainer_state.json                                everything else: step, options, scheduler state, optimizer
                                                      hyper-parameters, python RNG state
    checkpoint.json                                   size and sha256 of each file above; written last

A checkpoint is built in a temporary directory and renamed to `step-N` once complete; `find_checkpoint` trusts
a `step-N` only if checkpoint.json lists every file with the size and hash it has now, and otherwise falls back
to the next older one, saying which it skipped. Loading reads safetensors and JSON only, so a planted file can at
worst be refused; a pickle (`trainer_state.pt` of older versions, or planted) is refused by name.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import faults
from ..errors import UserError
from ..files import (fsync_directory, is_plain_name, make_staging, remove_entry, remove_orphans, seal, sha256_file,
                    write_atomic)

MANIFEST = "checkpoint.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
REQUIRED = ADAPTER_FILES + (STATE_TENSORS, STATE_JSON)
STATE_KEYS = {"step", "optimizer", "scheduler", "rng", "config"}
FORMAT = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_STEP_DIR = re.compile(r"step-(\d+)")
# Directories a killed run of llm2vec-fast <= 0.x left behind while writing a checkpoint.
_LEGACY_TEMP = re.compile(r"step-\d+\.tmp")


def step_directory(checkpoints: str, step: int) -> str:
    """The directory of checkpoint `step` inside `checkpoints`."""
    return os.path.join(checkpoints, f"step-{step}")


def save_checkpoint(checkpoints: str, step: int, save_adapter, state: dict) -> str:
    """Write checkpoint `step` (the adapter via save_adapter(directory), and `state`); returns its directory."""
    staging = make_staging(checkpoints, f"step-{step}")
    save_adapter(staging)
    faults.point("checkpoint", step, "adapter")
    tensors, meta = encode_state(state)
    save_file(tensors, os.path.join(staging, STATE_TENSORS))
    with open(os.path.join(staging, STATE_JSON), "w") as f:
        json.dump(meta, f)
    faults.point("checkpoint", step, "state")
    files = {name: dict(size=os.path.getsize(os.path.join(staging, name)),
                        sha256=sha256_file(os.path.join(staging, name))) for name in sorted(os.listdir(staging))}
    write_atomic(os.path.join(staging, MANIFEST), json.dumps(dict(format=FORMAT, step=step, files=files),
                                                             indent=1).encode())
    seal(staging)
    faults.point("checkpoint", step, "sealed")
    directory = step_directory(checkpoints, step)
    # A step-N already there is a leftover of the run this one resumed (it was skipped as damaged, or lies past
    # the checkpoint resumed from); the new one replaces it.
    remove_entry(directory)
    os.rename(staging, directory)
    fsync_directory(checkpoints)
    faults.point("checkpoint", step, "renamed")
    return directory


def clean_checkpoints(checkpoints: str) -> None:
    """Remove the temporary directories of checkpoint writes a kill interrupted."""
    remove_orphans(checkpoints)
    if os.path.isdir(checkpoints):
        for name in os.listdir(checkpoints):
            if _LEGACY_TEMP.fullmatch(name):
                remove_entry(os.path.join(checkpoints, name))


def find_checkpoint(checkpoints: str, report: bool = True) -> tuple[str, dict] | None:
    """(directory, state) of the newest intact checkpoint, or None. Damaged or incomplete ones are skipped (named
    on stderr when `report`); a checkpoint holding a pickle is refused with a UserError."""
    for step, directory in _step_directories(checkpoints):
        _refuse_pickles(directory)
        problem = verify(directory, step)
        if problem is None:
            try:
                return directory, load_state(directory)
            except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
                # Intact as written but not a state we wrote (a crafted or foreign checkpoint).
                problem = f"its trainer state does not decode ({type(error).__name__}: {error})"
        if report:
            print(f"skipping checkpoint {directory}: {problem}; falling back to an older one", file=sys.stderr)
    return None


def verify(directory: str, step: int) -> str | None:
    """None if checkpoint `directory` of `step` is whole (every file listed, present, of its size and hash),
    else what is wrong with it."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"no {MANIFEST} (its write was interrupted)"
    except (OSError, ValueError) as error:
        return f"{MANIFEST} is unreadable ({error})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("step") != step or \
            not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is not a step-{step} checkpoint manifest of format {FORMAT}"
    files = manifest["files"]
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"{MANIFEST} does not list {missing}"
    for name, expected in files.items():
        problem = _check_file(directory, name, expected)
        if problem:
            return problem
    return None


def _check_file(directory: str, name, expected) -> str | None:
    path = os.path.join(directory, name) if is_plain_name(name) else None
    if path is None or not isinstance(expected, dict):
        return f"{MANIFEST} lists an invalid entry {name!r}"
    if os.path.islink(path) or not os.path.isfile(path):
        return f"{name} is missing"
    if os.path.getsize(path) != expected.get("size"):
        return f"{name} has {os.path.getsize(path)} bytes, {expected.get('size')} were written (truncated?)"
    if sha256_file(path) != expected.get("sha256"):
        return f"{name} differs from what was written (sha256 mismatch)"
    return None


def load_state(directory: str) -> dict:
    """The trainer state of a verified checkpoint (see `encode_state`)."""
    with open(os.path.join(directory, STATE_JSON)) as f:
        meta = json.load(f)
    state = decode_state(meta, load_file(os.path.join(directory, STATE_TENSORS)))
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise ValueError(f"{STATE_JSON} lacks {sorted(STATE_KEYS - set(state if isinstance(state, dict) else ()))}")
    return state


def _step_directories(checkpoints: str) -> list[tuple[int, str]]:
    """(step, directory) of every `step-N` directory, newest first; other names (temporary ones) are ignored."""
    if not os.path.isdir(checkpoints):
        return []
    found = [(int(m.group(1)), os.path.join(checkpoints, name)) for name in os.listdir(checkpoints)
             if (m := _STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(checkpoints, name))]
    return sorted(found, reverse=True)


def _refuse_pickles(directory: str) -> None:
    pickles = sorted(name for name in os.listdir(directory) if name.endswith(PICKLE_SUFFIXES))
    if pickles:
        path = os.path.join(directory, pickles[0])
        raise UserError(f"checkpoint file {path} is a pickle (an llm2vec-fast checkpoint older than format {FORMAT}, "
                        f"or planted); it is never loaded, because unpickling can run code. Delete {directory} to "
                        f"resume from an older checkpoint, or start the run afresh with --overwrite.")


# ----------------------------------------------------------------------------------------- state encoding
# The trainer state (optimizer and scheduler state_dicts, RNG states) is a tree of dicts, lists, tuples,
# scalars, tensors and numpy arrays. Tensors and arrays go to safetensors under a numbered key; the tree goes to
# JSON with one-key objects marking what JSON cannot say itself (a tuple, a dict with non-string keys).

def encode_state(value) -> tuple[dict[str, torch.Tensor], object]:
    """(tensors for safetensors, a JSON-serialisable tree referring to them) of a trainer state."""
    tensors: dict[str, torch.Tensor] = {}
    return tensors, _encode(value, tensors)


def decode_state(tree, tensors: dict[str, torch.Tensor]):
    """The inverse of `encode_state`."""
    return _decode(tree, tensors)


def _encode(value, tensors: dict):
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.frombuffer(bytearray(value.tobytes()), dtype=torch.uint8) if value.nbytes else \
            torch.zeros(0, dtype=torch.uint8)
        return {"__ndarray__": key, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (tensors, arrays, numbers, strings, "
                    f"lists, tuples and dicts only)")


def _decode(tree, tensors: dict):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        dtype = np.dtype(tree["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"checkpoint array of dtype {dtype} refused (numbers only)")
        return np.frombuffer(tensors[tree["__ndarray__"]].numpy().tobytes(), dtype=dtype).reshape(tree["shape"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}

