"""An encode run's fingerprint, and the content hashes of model and input files it holds, cached so that re-running
a command over large files stays cheap.

`run_fingerprint` is what identifies a run: the config's `identity()` (config.py) and the sha256 of the input and of
every file that can change an embedding; `fingerprint_differences` says how two of them differ. Hashing a 15 GB
checkpoint takes about a minute, so each hash is cached in a small JSON file under the llm2vec-fast cache directory
(LLM2VEC_FAST_CACHE, see default_model.py), keyed by the file's real path, size, inode, mtime and ctime: any write,
rename-over or `touch` of the file changes one of them (ctime cannot be set back by a user). The cache is an
optimisation only: an unreadable or unwritable cache means hashing again, never an error.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

from ..default_model import cache_root
from ..files import sha256_file, write_atomic
from ..loading import adapter_base_name, has_weights, is_adapter_directory, resolve_directory

if TYPE_CHECKING:
    from .config import EncodeJobConfig

FINGERPRINT_VERSION = 2
# Fingerprint keys that older versions recorded as None when unset, before defaults were resolved: such a None
# matches whatever they resolve to now, since the model files that decide the default are fingerprinted too.
RESOLVED_SINCE_UNSET = ("pooling", "max_length")
CACHE_FILE = "file_hashes.json"
# A file changed twice within one timestamp tick keeps its mtime and ctime; a hash taken right after a change is
# therefore not cached, or a second same-size write in that tick would be missed.
RACY_SECONDS = 2.0
# Files of a model directory that nothing we load reads: documentation, VCS/hub metadata, and weights of other
# frameworks (large, so hashing them would only cost time).
_IGNORED_NAMES = frozenset({"flax_model.msgpack", "tf_model.h5", "rust_model.ot"})
_IGNORED_PREFIXES = (".", "README", "LICENSE")
_IGNORED_SUFFIXES = (".md", ".onnx", ".gguf")


def run_fingerprint(config: EncodeJobConfig, model_dir: str, adapter_dir: str | None) -> dict:
    """Everything that changes the stored embeddings of the run `config` (resolved: see job.resolve_config)
    describes: its identity, the sha256 of its input and of every file of the model directory model_dir (with the
    adapter directory adapter_dir's, when --peft-model is given), and of the --ranges file when given."""
    from .sources import input_identity  # sources.py imports this module for file_sha256
    from .storage import ranges_file_sha256

    adapter = {} if adapter_dir is None else {"peft_model_files": directory_sha256s(adapter_dir)}
    return {"version": FINGERPRINT_VERSION, **config.identity(), **_model_identity(model_dir), **adapter,
            **input_identity(config.input_spec()), **ranges_file_sha256(config)}


def fingerprint_differences(stored: dict, now: dict) -> list[str]:
    """How fingerprint `now` differs from `stored`, one phrase per key ([] when they agree)."""
    differences = []
    for key in sorted(set(stored) | set(now)):
        if stored.get(key) == now.get(key) or (key in RESOLVED_SINCE_UNSET and stored.get(key, 0) is None):
            continue
        differences.append(_difference(key, stored.get(key), now.get(key)))
    return differences


def _difference(key: str, stored, now) -> str:
    if isinstance(stored, dict) or isinstance(now, dict):
        stored, now = (value if isinstance(value, dict) else {} for value in (stored, now))
        changed = sorted(name for name in set(stored) | set(now) if stored.get(name) != now.get(name))
        return f"{key}: {', '.join(changed)} changed"
    if key.endswith("sha256"):
        return f"{key}: the content changed"
    return f"{key}: {stored!r} there, {now!r} now"


def _model_identity(model_dir: str) -> dict:
    """The sha256 of every file of the model directory that can change an embedding (config, weights, adapter,
    tokenizer, llm2vec_config.json), and of the base model's for an adapter directory without base weights."""
    identity = {"model_files": directory_sha256s(model_dir)}
    base_dir = _adapter_base_dir(model_dir)
    if base_dir is not None:
        identity["base_model_files"] = directory_sha256s(base_dir)
    return identity


def _adapter_base_dir(model_dir: str) -> str | None:
    if not is_adapter_directory(model_dir) or has_weights(model_dir):
        return None
    try:
        return resolve_directory(adapter_base_name(model_dir), "base model named in the adapter config")
    except (OSError, ValueError, TypeError, RuntimeError):
        return None  # loading the model reports this with its own clear error, before anything is encoded


def file_sha256(path: str) -> str:
    """The sha256 (hex) of the file at `path`, taken from the cache when the file is unchanged since last time."""
    return _cached_sha256s([path])[0]


def directory_sha256s(directory: str) -> dict[str, str]:
    """file name -> sha256 of every regular file directly in `directory` that can change what is loaded from it.

    Subdirectories are not read: the loaders read a model directory's top level only.
    """
    names = sorted(n for n in os.listdir(directory) if _matters(n) and os.path.isfile(os.path.join(directory, n)))
    return dict(zip(names, _cached_sha256s([os.path.join(directory, n) for n in names])))


def _cached_sha256s(paths: list[str]) -> list[str]:
    # The cache is read once and written at most once for all of `paths` (it is rewritten whole each time).
    cache, changed, digests = _read_cache(), False, []
    for path in paths:
        real = os.path.realpath(path)
        started = time.time()
        stat = os.stat(real)
        key = [stat.st_size, stat.st_ino, stat.st_dev, stat.st_mtime_ns, stat.st_ctime_ns]
        entry = cache.get(real)
        if entry is not None and entry.get("key") == key:
            digests.append(entry["sha256"])
            continue
        digests.append(sha256_file(real))
        if started - stat.st_ctime_ns / 1e9 > RACY_SECONDS:
            cache[real] = {"key": key, "sha256": digests[-1]}
            changed = True
    if changed:
        _write_cache(cache)
    return digests


def _matters(name: str) -> bool:
    return not (name in _IGNORED_NAMES or name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES))


def _cache_path() -> str:
    return os.path.join(cache_root(), CACHE_FILE)


def _read_cache() -> dict:
    try:
        with open(_cache_path()) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
    # Several processes (torchrun ranks) may write at once: each writes its own temporary file and renames it, so
    # the cache is always whole JSON; an entry lost to a concurrent writer is only hashed again.
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(cache).encode())
    except OSError:
        pass
