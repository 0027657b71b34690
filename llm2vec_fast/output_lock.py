"""One writer per output directory: the lock `encode` and `train` hold on their --output while they run.

Each process of a run (each torchrun rank) holds an exclusive `flock` on its own lock file in the directory,
``.llm2vec-fast-rank<R>.lock``, for as long as it runs; a second run into the same directory finds rank R's lock
taken and is refused at once with a message naming the holder (PID, host, command, start time), which the holder
wrote into the file. The kernel drops a flock when its process dies, however it dies, so a killed run never
leaves a stale lock behind: the next run takes it over. The files stay (unlinking a lock file would let two runs
lock two different files); they are ours, and nothing else in a run's directory listing counts them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import socket
import sys

from .errors import UserError

LOCK_FILE = re.compile(r"\.llm2vec-fast-rank\d+\.lock")


def lock_name(rank: int) -> str:
    return f".llm2vec-fast-rank{rank}.lock"


class OutputLock:
    """The lock of one process (rank) on `directory` (which must exist). A context manager; also `acquire` /
    `release` for owners with a longer life."""

    def __init__(self, directory: str, rank: int = 0, what: str = "a run"):
        self.path = os.path.join(directory, lock_name(rank))
        self.what = what
        self._fd = None

    def acquire(self) -> "OutputLock":
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{self.path} is a symbolic link; remove it, or choose a new output directory.") \
                    from None
            raise UserError(f"cannot create the lock {self.path} ({error.strerror}); choose a writable output "
                            f"directory.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(fd)
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserError(f"{os.path.dirname(self.path) or '.'} is in use by another run ({holder}); wait for it "
                            f"to finish or stop it, or choose another output directory. Two runs into one "
                            f"directory would mix their results.") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                 "command": " ".join(sys.argv)[:300],
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return "holder unknown"
    if not isinstance(holder, dict):
        return "holder unknown"
    return (f"{holder.get('what', 'a run')}, PID {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('since', '?')}: {holder.get('command', '')}")
