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

Consistent hashes prove only that the files are those the manifest lists, so a crafted checkpoint passes them:
its content is checked too, and one that does not decode (a bad safetensors header, JSON nested 100k deep) or
is not a trainer state of its step (keys missing, a step that is not a whole number or not its directory's, an
RNG state that no generator takes) is skipped like a damaged one, named with the reason; never a traceback.
What depends on the model (tensor shapes, the optimizer's parameters) is checked where it is applied
(loop._restore).
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import torch
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


class CheckpointError(ValueError):
    """A checkpoint whose files are whole but whose content is not a state this run can continue from (a crafted
    or foreign checkpoint); the message says why."""


def find_checkpoint(checkpoints: str, report: bool = True) -> tuple[str, dict] | None:
    """(directory, state) of the newest intact checkpoint, or None. Damaged, incomplete or inconsistent ones are
    skipped (named on stderr when `report`); a checkpoint holding a pickle is refused with a UserError."""
    for directory, state, problem in checkpoint_candidates(checkpoints):
        if problem is None:
            return directory, state
        if report:
            report_skipped(directory, problem)
    return None


def checkpoint_candidates(checkpoints: str):
    """(directory, state, None) for each `step-N`, newest first, whose files are whole (`verify`) and whose state
    decodes and is consistent (`load_state`); (directory, None, what is wrong) for any other. Never raises for a
    checkpoint's content, except a pickle in it: a UserError (it is refused by name, never loaded)."""
    for step, directory in _step_directories(checkpoints):
        _refuse_pickles(directory)
        problem = verify(directory, step)
        if problem is not None:
            yield directory, None, problem
            continue
        try:
            state = load_state(directory, step)
        except Exception as error:  # noqa: BLE001 - crafted content may fail anywhere; it is skipped, named
            yield directory, None, describe_error(error)
            continue
        yield directory, state, None


def report_skipped(directory: str, problem: str) -> None:
    """Say on stderr that checkpoint `directory` is skipped, and why."""
    print(f"skipping checkpoint {directory}: {problem}; falling back to an older one", file=sys.stderr)


def describe_error(error: BaseException) -> str:
    """Why a checkpoint was refused, on one line, for an exception raised while reading or applying it."""
    if isinstance(error, CheckpointError):
        return str(error)
    if isinstance(error, RecursionError):
        return "its trainer state is nested too deeply to read (not a state llm2vec-fast wrote)"
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"its trainer state does not decode ({type(error).__name__}: {text})"


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


def load_state(directory: str, step: int | None = None) -> dict:
    """The trainer state of a verified checkpoint (see `encode_state`), of `step` when given. A state that is not
    one we wrote (a crafted or foreign checkpoint: keys missing, a step that is not its directory's, an RNG state
    that is none) raises CheckpointError; undecodable content raises what the decoder raised."""
    with open(os.path.join(directory, STATE_JSON)) as f:
        meta = json.load(f)
    state = decode_state(meta, load_file(os.path.join(directory, STATE_TENSORS)))
    problem = state_problem(state, step)
    if problem is not None:
        raise CheckpointError(problem)
    return state


def state_problem(state, step: int | None = None) -> str | None:
    """None when `state` has the form of a trainer state (of `step`, when given), else what is wrong with it."""
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        return f"{STATE_JSON} lacks {sorted(STATE_KEYS - set(state if isinstance(state, dict) else ()))}"
    value = state["step"]
    if type(value) is not int or value < 0:
        return f"its step {value!r} is not a whole number of steps >= 0"
    if step is not None and value != step:
        return f"its trainer state is of step {value}, but its directory and manifest of step {step}"
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict) and
            isinstance(optimizer.get("param_groups"), list) and
            all(isinstance(group, dict) for group in optimizer["param_groups"])):
        return "its optimizer state is not one (no 'state' and 'param_groups')"
    for key in ("scheduler", "config", "rng"):
        if not isinstance(state[key], dict):
            return f"its {key} state is not one (a JSON {type(state[key]).__name__})"
    return _rng_problem(state["rng"])


def _rng_problem(rng: dict) -> str | None:
    """None when `rng` holds the Python, NumPy and torch generator states `_rng_state` saves; each is tried on a
    scratch generator, so the global ones are untouched."""
    import random

    missing = sorted({"python", "numpy", "torch"} - set(rng))
    if missing:
        return f"its RNG state lacks {missing}"
    try:
        random.Random().setstate(rng["python"])
        np.random.RandomState().set_state(rng["numpy"])
        if not isinstance(rng["torch"], torch.Tensor):
            raise TypeError(f"the torch state is a {type(rng['torch']).__name__}")
        torch.Generator().set_state(rng["torch"])
        cuda = rng.get("cuda", [])
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                 for t in cuda):
            raise TypeError("the CUDA states are not byte tensors")
    except Exception as error:  # noqa: BLE001 - whatever the generators refuse
        return f"its RNG state is not a generator state ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    return None


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

