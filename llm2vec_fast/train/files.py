"""Writing training outputs so that a kill at any moment leaves every file whole or absent.

Each file is written under a temporary name, fsynced and renamed into place; the rename replaces a symlink
planted at the final name instead of writing through it. Temporary names are unpredictable and created
exclusively (mkstemp / mkdtemp), so a symlink planted at a temporary name is never followed either. Whatever a
kill leaves under a temporary name carries TEMP_MARK and is removed by `remove_orphans` at the next start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

TEMP_MARK = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create 0600 / 0700 entries; outputs get the modes a plain open() / mkdir() would give.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def temp_prefix(name: str) -> str:
    return f".{name}{TEMP_MARK}"


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path`: readers, and a run after a kill, see the old file or the new one, never a part."""
    directory, name = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(name), dir=directory or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise
    fsync_directory(directory)


def make_staging(parent: str, name: str) -> str:
    """A fresh, empty directory in `parent` to build `name` in before it is renamed or moved into place."""
    return tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent)


def seal(directory: str) -> None:
    """fsync every file of `directory` (written by code that does not fsync, e.g. save_pretrained) and give the
    directory and its files the usual modes; after this, a rename publishes complete files only."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fchmod(fd, _FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.chmod(directory, _DIR_MODE)
    fsync_directory(directory)


def move_files(staging: str, target: str, names: list[str]) -> None:
    """Rename the sealed files `names` of `staging` into `target` (replacing same-named files or symlinks), then
    remove `staging`."""
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    fsync_directory(target)
    os.rmdir(staging)


def remove_orphans(directory: str) -> list[str]:
    """Remove what a killed run left under a temporary name in `directory`; returns the names removed."""
    if not os.path.isdir(directory):
        return []
    removed = [name for name in os.listdir(directory) if name.startswith(".") and TEMP_MARK in name]
    for name in removed:
        remove_entry(os.path.join(directory, name))
    return removed


def remove_entry(path: str) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; nothing if absent."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_plain_name(name) -> bool:
    """True for a file name that stays inside its directory (no separator, not '.' or '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and \
        "/" not in name and "\\" not in name


def fsync_directory(directory: str) -> None:
    # The rename itself must reach the disk, or a power cut could forget a file that a later step relies on.
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
