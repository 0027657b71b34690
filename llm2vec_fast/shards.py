"""The output directory of `llm2vec-fast encode`: shard files, per-rank progress, fingerprint, merged index.

Layout (paths relative to the output directory; S = --shard-size):

    fingerprint.json               the arguments and input identity the shards are computed from
    shards/shard-000007.npy        embeddings of the valid lines among input lines 7*S+1 .. 8*S, [rows, dim]
    shards/shard-000007.lines.npy  their input line numbers (int64, counted from 1)
    progress/rank0.json            the shards rank 0 finished, with their skipped lines (rewritten atomically)
    manifest.json                  written last, once every shard is done: count, dim, dtype, model, pooling,
                                   the shards with their row ranges, and every skipped line with its reason
    line_numbers.npy               the input line number of every output row (int64, [count])

Rows are in input order: shard by shard, line by line. Every file is written to a temporary name, fsynced and
renamed into place, and a shard counts as done only once a progress file records it, so a run killed at any
point leaves nothing half-written that a resumed run would trust.

Read the result with `load_embeddings(output_dir)`.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal

import numpy as np

from .errors import UserError

FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"
LINE_NUMBERS = "line_numbers.npy"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
_OWNED = (FINGERPRINT, MANIFEST, LINE_NUMBERS, SHARD_DIR, PROGRESS_DIR)
_TEMP_MARK = ".tmp-"
# Not a temp mark: rank 0 clears temp files while other ranks may still be probing the directory.
_PROBE_MARK = ".write-probe-"
# Test-only: "K" kills the process (SIGKILL) after it recorded K shards; "K:temp" while the (K+1)-th shard is
# still a temporary file; "K:unrecorded" after that shard is in place but before it is recorded.
TEST_KILL_ENV = "LLM2VEC_FAST_TEST_KILL_AFTER_SHARDS"


def shard_stem(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:06d}"


def atomic_write(path: str, data: bytes, before_rename=None) -> None:
    """Write `data` to `path` so that readers (and a later run after a crash) see either nothing or all of it."""
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f".{name}{_TEMP_MARK}{os.getpid()}")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(temp, path)
    _fsync_directory(directory)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def json_bytes(value) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


def _fsync_directory(directory: str) -> None:
    # The rename itself must reach the disk too, or a power cut could forget a shard that progress recorded.
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """One rank's view of an output directory."""

    def __init__(self, path: str, rank: int = 0):
        self.path = path
        self.rank = rank
        self._records: dict[int, dict] = {}
        self._committed = 0
        self._kill = _parse_test_kill(os.environ.get(TEST_KILL_ENV))

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -------------------------------------------------------------------------------------------- setup

    def check(self, fingerprint: dict, overwrite: bool) -> None:
        """Refuse an output directory that holds something else, or shards made with other arguments."""
        self._check_writable()
        if overwrite:
            return
        stored = self.read_fingerprint()
        if stored is None:
            foreign = [n for n in os.listdir(self.path)
                       if n not in _OWNED and not n.startswith(_PROBE_MARK) and _TEMP_MARK not in n]
            if foreign:
                raise UserError(f"--output {self.path!r} is not empty and was not written by llm2vec-fast encode "
                                f"(it holds {foreign[0]!r}); choose a new or empty directory.")
            return
        differences = [_difference(key, stored.get(key), fingerprint.get(key))
                       for key in sorted(set(stored) | set(fingerprint)) if stored.get(key) != fingerprint.get(key)]
        if differences:
            raise UserError(f"--output {self.path!r} holds embeddings made with other arguments or another input ("
                            f"{'; '.join(differences)}). Pass --overwrite to replace them, or choose a new --output "
                            f"directory.")

    def _check_writable(self) -> None:
        # Fail now, not after a long scan of the input or when the first shard is due.
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--output {self.path!r} is a file; pass a directory.")
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = self.file(f"{_PROBE_MARK}{os.getpid()}-{self.rank}")
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except OSError as error:
            raise UserError(f"cannot write to --output {self.path!r} ({error.strerror or error}); choose a writable "
                            f"directory.") from None

    def prepare(self, fingerprint: dict, overwrite: bool) -> None:
        """Create (or, with overwrite, empty) the directory and store the fingerprint. Rank 0 only."""
        if overwrite and os.path.isdir(self.path):
            for name in _OWNED:
                target = self.file(name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
        try:
            for sub in (SHARD_DIR, PROGRESS_DIR):
                os.makedirs(self.file(sub), exist_ok=True)
            # Files a killed run left under a temporary name are never trusted; clear them before anyone writes.
            for temp in glob.glob(self.file(f"*/.*{_TEMP_MARK}*")) + glob.glob(self.file(f".*{_TEMP_MARK}*")):
                os.remove(temp)
            if self.read_fingerprint() != fingerprint:
                atomic_write(self.file(FINGERPRINT), json_bytes(fingerprint))
        except OSError as error:
            raise UserError(f"cannot write to --output {self.path!r} ({error.strerror or error}); choose a writable "
                            f"directory.") from None

    def read_fingerprint(self) -> dict | None:
        path = self.file(FINGERPRINT)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def is_complete(self) -> bool:
        return os.path.isfile(self.file(MANIFEST))

    # ----------------------------------------------------------------------------------------- progress

    def completed(self) -> dict[int, dict]:
        """Shards recorded as done by any rank (of this run or an earlier one) whose files are in place."""
        records = {}
        for path in sorted(glob.glob(self.file(f"{PROGRESS_DIR}/rank*.json"))):
            with open(path) as f:
                for record in json.load(f)["shards"]:
                    records[record["shard"]] = record
        done = {k: r for k, r in records.items() if self._files_match(r)}
        own = self.file(f"{PROGRESS_DIR}/rank{self.rank}.json")
        if os.path.isfile(own):
            with open(own) as f:
                self._records = {r["shard"]: r for r in json.load(f)["shards"] if r["shard"] in done}
        return done

    def _files_match(self, record: dict) -> bool:
        stem = self.file(shard_stem(record["shard"]))
        try:
            embeddings = np.load(stem + ".npy", mmap_mode="r")
            lines = np.load(stem + ".lines.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        return embeddings.shape[0] == record["rows"] == lines.shape[0]

    def commit_shard(self, index: int, embeddings: np.ndarray, line_numbers: list[int], record: dict) -> None:
        """Write one shard's files, then record it in this rank's progress file."""
        stem = self.file(shard_stem(index))
        atomic_write(stem + ".lines.npy", npy_bytes(np.asarray(line_numbers, dtype=np.int64)))
        atomic_write(stem + ".npy", npy_bytes(embeddings), before_rename=lambda: self._test_kill("temp"))
        self._test_kill("unrecorded")
        self._records[index] = dict(record, shard=index, rows=len(line_numbers))
        shards = [self._records[k] for k in sorted(self._records)]
        atomic_write(self.file(f"{PROGRESS_DIR}/rank{self.rank}.json"), json_bytes({"rank": self.rank,
                                                                                    "shards": shards}))
        self._committed += 1
        self._test_kill("recorded")

    def _test_kill(self, point: str) -> None:
        # self._committed counts this process's recorded shards; at "temp" / "unrecorded" the next one is underway.
        if self._kill == (self._committed, point):
            os.kill(os.getpid(), signal.SIGKILL)

    # -------------------------------------------------------------------------------------------- merge

    def merge(self, num_shards: int, meta: dict) -> dict:
        """Write the global index once every shard 0..num_shards-1 is done; return the manifest. Rank 0 only."""
        done = self.completed()
        missing = [k for k in range(num_shards) if k not in done]
        if missing:
            raise RuntimeError(f"cannot merge {self.path!r}: shards {missing[:10]} are not done")
        shards, line_chunks, skipped, row = [], [], [], 0
        dim, dtype = meta["dim"], meta["dtype"]
        for k in range(num_shards):
            record = done[k]
            stem = shard_stem(k)
            embeddings = np.load(self.file(stem + ".npy"), mmap_mode="r")
            if embeddings.shape[1:] != (dim,) or embeddings.dtype != np.dtype(dtype):
                raise RuntimeError(f"{stem}.npy has shape {embeddings.shape} {embeddings.dtype}, expected "
                                   f"[rows, {dim}] {dtype}")
            line_chunks.append(np.load(self.file(stem + ".lines.npy")))
            shards.append({"file": stem + ".npy", "lines_file": stem + ".lines.npy", "rows": record["rows"],
                           "row_start": row, "first_line": record["first_line"], "last_line": record["last_line"],
                           "input_sha256": record["input_sha256"]})
            skipped.extend({"line": line, "reason": reason} for line, reason in record["skipped"])
            row += record["rows"]
        line_numbers = np.concatenate(line_chunks) if line_chunks else np.zeros(0, dtype=np.int64)
        atomic_write(self.file(LINE_NUMBERS), npy_bytes(line_numbers.astype(np.int64)))
        manifest = dict(meta, count=row, shards=shards, skipped=skipped, line_numbers=LINE_NUMBERS)
        atomic_write(self.file(MANIFEST), json_bytes(manifest))
        return manifest


def load_embeddings(output_dir: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a finished `llm2vec-fast encode` output.

    Returns (embeddings [N, dim] in the shard dtype, line_numbers int64 [N]): row i embeds input line
    line_numbers[i] (counted from 1). Rows are in input order; skipped lines are listed in manifest.json.
    mmap: memory-map each shard while concatenating (saves a copy for very large outputs).
    """
    manifest_path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{output_dir!r} has no {MANIFEST}: the encode run did not finish (re-run the same "
                                f"command to resume it) or this is not an llm2vec-fast encode output.")
    with open(manifest_path) as f:
        manifest = json.load(f)
    mode = "r" if mmap else None
    parts = [np.load(os.path.join(output_dir, shard["file"]), mmap_mode=mode) for shard in manifest["shards"]]
    embeddings = (np.concatenate(parts) if parts else
                  np.zeros((0, manifest["dim"]), dtype=np.dtype(manifest["dtype"])))
    line_numbers = np.load(os.path.join(output_dir, manifest["line_numbers"]))
    if embeddings.shape[0] != manifest["count"] or line_numbers.shape[0] != manifest["count"]:
        raise ValueError(f"{output_dir!r} is inconsistent: manifest says {manifest['count']} rows, shards hold "
                         f"{embeddings.shape[0]}, the index {line_numbers.shape[0]}.")
    return embeddings, line_numbers


def _difference(key: str, stored, now) -> str:
    if isinstance(stored, dict) or isinstance(now, dict):
        return f"{key} changed"
    return f"{key}: {stored!r} there, {now!r} now"


def _parse_test_kill(value: str | None):
    if not value:
        return None
    after, _, where = value.partition(":")
    return int(after), where or "recorded"
