"""Writing files so that a kill at any moment leaves each one whole or absent, and a planted link is never
followed: the one place that writes our outputs (encode shards, training runs and checkpoints, the hash cache).

Each file is written under a temporary name, fsynced and renamed into place; the rename replaces a symlink
planted at the final name instead of writing through it. Temporary names are unpredictable and created
exclusively (O_EXCL | O_NOFOLLOW, mkdtemp), so a symlink planted at a temporary name is never followed either.
Whatever a kill leaves under a temporary name starts with "." and carries TEMP_MARK, and `remove_orphans` (or the
owner of the directory) removes it at the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile

TEMP_MARK = ".tmp-"
CHUNK_BYTES = 1 << 20
# Mode 0o666 at creation: the kernel applies the umask, as for any new file.
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkdtemp creates 0700 directories, and save_pretrained's files get whatever its own writes give; sealed
# outputs get the modes a plain open() / mkdir() would give.
_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()


def temp_prefix(name: str) -> str:
    """The prefix of the temporary files that stand for `name` while it is written: ".NAME.tmp-"."""
    return f".{name}{TEMP_MARK}"


def write_atomic(path: str, data: bytes, before_rename=None) -> None:
    """Write `data` to `path`: readers, and a run after a kill, see the old file or the new one, never a part.

    before_rename: called once the temporary file is complete (tests kill the process there). An OSError (a
    full disk) removes the temporary file and propagates.
    """
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f"{temp_prefix(name)}{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(temp, _NEW_FILE_FLAGS, 0o666)
    try:
        try:
            _write_fully(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if before_rename is not None:
            before_rename()
        os.replace(temp, path)  # replaces a link planted at `path` itself, never what it points to
    except BaseException:
        remove_if_present(temp)
        raise
    fsync_directory(directory)


def create_exclusive(path: str) -> None:
    """Create the empty file `path`, refusing to reuse or follow anything already there (a write probe)."""
    os.close(os.open(path, _NEW_FILE_FLAGS, 0o666))


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def make_staging(parent: str, name: str) -> str:
    """A fresh, empty directory in `parent` to build `name` in before it is renamed or moved into place."""
    return tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent)


def staging_beside(path: str, kind: str) -> str:
    """A fresh directory next to `path` (its real location) to build what `path` will hold.

    Beside the destination, so that each rename into place stays on one file system. Unlike mkdtemp, os.mkdir
    gives the directory the umask's permissions, like the files written into it. The name carries `kind` and our
    pid, so that the next call removes what a killed process left (and never a live process's staging).
    """
    real = os.path.realpath(path)
    parent, prefix = os.path.dirname(real) or ".", f".{os.path.basename(real)}.{kind}-"
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned(parent, prefix)
    staging = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(6)}")
    os.mkdir(staging)
    return staging


def _remove_abandoned(parent: str, prefix: str) -> None:
    for name in os.listdir(parent):
        pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) is not an existence check elsewhere (on Windows it sends CTRL_C_EVENT)
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, delivers nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists and belongs to another user
    return True


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
    """The sha256 (hex) of a file's content, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def is_plain_name(name) -> bool:
    """True for a file name that stays inside its directory (no separator, not '.' or '..')."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and \
        "/" not in name and "\\" not in name


def recorded_names(directory: str, record: str) -> set:
    """The file names that the JSON list `record` in `directory` says a writer of ours put there (save, export),
    keeping only plain names; empty without a readable record (a link, a damaged file: nothing is trusted)."""
    path = os.path.join(directory, record)
    if os.path.islink(path) or not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, ValueError, RecursionError):
        return set()
    return {n for n in names if is_plain_name(n)} if isinstance(names, list) else set()


def fsync_directory(directory: str) -> None:
    """fsync `directory` ("" for the current one) so that the renames in it reach the disk."""
    # The rename itself must reach the disk, or a power cut could forget a file that a later step relies on.
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_present(path: str) -> None:
    """Remove the file `path`; a file that does not exist is no error."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
