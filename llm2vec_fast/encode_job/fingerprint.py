"""Content hashes of model and input files, cached so that re-running a command over large files stays cheap.

`encode` fingerprints its output with the sha256 of every file that can change an embedding. Hashing a 15 GB
checkpoint takes about a minute, so each hash is cached in a small JSON file under the llm2vec-fast cache directory
(LLM2VEC_FAST_CACHE, see default_model.py), keyed by the file's real path, size, inode, mtime and ctime: any write,
rename-over or `touch` of the file changes one of them (ctime cannot be set back by a user). The cache is an
optimisation only: an unreadable or unwritable cache means hashing again, never an error.
"""

from __future__ import annotations

import json
import os
import time

from ..default_model import cache_root
from ..files import sha256_file, write_atomic

CACHE_FILE = "file_hashes.json"
# A file changed twice within one timestamp tick keeps its mtime and ctime; a hash taken right after a change is
# therefore not cached, or a second same-size write in that tick would be missed.
RACY_SECONDS = 2.0
# Files of a model directory that nothing we load reads: documentation, VCS/hub metadata, and weights of other
# frameworks (large, so hashing them would only cost time).
_IGNORED_NAMES = frozenset({"flax_model.msgpack", "tf_model.h5", "rust_model.ot"})
_IGNORED_PREFIXES = (".", "README", "LICENSE")
_IGNORED_SUFFIXES = (".md", ".onnx", ".gguf")


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
