"""The output directory of `llm2vec-fast encode`: shard files, per-rank progress, fingerprint, merged index.

Layout (paths relative to the output directory; S = --shard-size):

    fingerprint.json               the arguments and the sha256 of the input and of every model file the shards
                                   are computed from, marked "written_by": "llm2vec-fast encode"
    shards/shard-000007.npy        embeddings of the valid lines among input lines 7*S+1 .. 8*S, [rows, dim]
    shards/shard-000007.lines.npy  their input line numbers (int64, counted from 1)
    shards/shard-000007.parquet    instead of the two above with --output-format parquet: line numbers, ids
                                   (--id-field) and embeddings in one file (see parquet_shards.py)
    progress/rank0.json            the shards rank 0 finished, with their skipped lines (rewritten atomically)
    manifest.json                  written last, once every shard is done: count, dim, dtype, model, pooling,
                                   the shards with their row ranges, and every skipped line with its reason
    line_numbers.npy               the input line number of every output row (int64, [count])

Rows are in input order: shard by shard, line by line. Every file is written to a temporary name, fsynced and
renamed into place, and a shard counts as done only once a progress file records it, so a run killed at any
point leaves nothing half-written that a resumed run would trust; the next run deletes the temporary files.

A directory is ours only if its fingerprint.json carries the WRITTEN_BY mark. We write into no other non-empty
directory, and --overwrite deletes only the files named above, in a directory that is ours.

Read the result with `load_embeddings(output_dir)`, which trusts no path in the manifest that leads outside the
directory and checks every shard against the index; `load_embeddings(output_dir, mmap=True)` returns the .npy
shards memory-mapped behind one lazy view (stacked.py) instead of a copy.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import re
import secrets
import signal
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..files import TEMP_MARK, create_exclusive, remove_if_present, write_atomic
from .stacked import StackedRows

FINGERPRINT = "fingerprint.json"
MANIFEST = "manifest.json"
LINE_NUMBERS = "line_numbers.npy"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
# Stored in every fingerprint: a directory is ours (and --overwrite may delete our files in it) only if it says so.
WRITTEN_BY = "llm2vec-fast encode"
OUTPUT_FORMATS = ("npy", "parquet")
_SHARD_FILE = re.compile(r"shard-\d{6,}(\.lines\.npy|\.npy|\.parquet)")
_PROGRESS_FILE = re.compile(r"rank\d+\.json")
_PROBE_MARK = ".write-probe-"
# Test-only: "K" kills the process (SIGKILL) after it recorded K shards; "K:temp" while the (K+1)-th shard is
# still a temporary file; "K:unrecorded" after that shard is in place but before it is recorded.
TEST_KILL_ENV = "LLM2VEC_FAST_TEST_KILL_AFTER_SHARDS"


def shard_stem(index: int) -> str:
    """The path of shard `index`'s files in the output directory, without suffix: "shards/shard-000042"."""
    return f"{SHARD_DIR}/shard-{index:06d}"


def atomic_write(path: str, data: bytes, before_rename=None) -> None:
    """`files.write_atomic`, with a failure (a full disk) turned into a UserError naming `path` and the fix."""
    with _write_errors(path):
        write_atomic(path, data, before_rename)


@contextmanager
def _write_errors(path: str):
    # A full disk or a lost mount is the user's to fix; finished shards are kept, so the fix ends in a resume.
    try:
        yield
    except OSError as error:
        fix = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT)
               else "check the directory's permissions and free space")
        raise UserError(f"cannot write {path} ({error.strerror or error}); {fix}, then re-run the same command to "
                        f"resume (finished shards are kept).") from None


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (pickled objects refused)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def json_bytes(value) -> bytes:
    """`value` as the bytes of indented JSON with sorted keys and a final newline."""
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


class OutputDir:
    """One rank's view of an output directory.

    output_format: "npy" (two .npy files per shard) or "parquet" (one Parquet file per shard, with ids when
    id_kind, "int64" or "string", is given)."""

    def __init__(self, path: str, rank: int = 0, output_format: str = "npy", id_kind: str | None = None):
        self.path = path
        self.rank = rank
        self.output_format = output_format
        self.id_kind = id_kind
        self._records: dict[int, dict] = {}
        self._committed = 0
        self._kill = _parse_test_kill(os.environ.get(TEST_KILL_ENV))

    def file(self, name: str) -> str:
        """The path of `name` inside the output directory."""
        return os.path.join(self.path, name)

    # -------------------------------------------------------------------------------------------- setup

    def check(self, fingerprint: dict, overwrite: bool) -> None:
        """Refuse an output directory that we did not write, or (unless overwrite) holds shards made with other
        arguments. A directory is ours only if its fingerprint.json says so; any other non-empty directory is
        refused even with overwrite, since overwrite deletes files. A fingerprint with no finished shard beside it
        (a run that failed before encoding anything: a bad model, a bad line) guards nothing: it is accepted, and
        `prepare` replaces it."""
        self._check_writable()
        self._check_no_links()
        stored = self._stored_fingerprint()
        if stored is None or overwrite or not self._holds_results():
            return
        now = _stamped(fingerprint)
        differences = [_difference(key, stored.get(key), now.get(key))
                       for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key)]
        if differences:
            raise UserError(f"--output {self.path!r} holds embeddings made with other arguments, another model or "
                            f"another input ({'; '.join(differences)}). Pass --overwrite to replace them, or choose "
                            f"a new --output directory.")

    def _holds_results(self) -> bool:
        return self.is_complete() or bool(self.completed())

    def _check_writable(self) -> None:
        # Fail now, not after a long scan of the input or when the first shard is due.
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UserError(f"--output {self.path!r} is a file; pass a directory.")
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = self.file(f"{_PROBE_MARK}{os.getpid()}-{self.rank}-{secrets.token_hex(4)}")
            create_exclusive(probe)
            os.remove(probe)
        except OSError as error:
            raise UserError(f"cannot write to --output {self.path!r} ({error.strerror or error}); choose a writable "
                            f"directory.") from None

    def _check_no_links(self) -> None:
        # Writing through a planted link would put our files (and, with --overwrite, our deletions) elsewhere.
        for name in (FINGERPRINT, SHARD_DIR, PROGRESS_DIR):
            target = self.file(name)
            if os.path.islink(target):
                raise UserError(f"{target} is a symbolic link; llm2vec-fast writes only into directories it made. "
                                f"Remove the link, or choose a new --output directory.")
        for name in (SHARD_DIR, PROGRESS_DIR):
            if os.path.exists(self.file(name)) and not os.path.isdir(self.file(name)):
                raise UserError(f"{self.file(name)} is not a directory; choose a new --output directory.")

    def _stored_fingerprint(self) -> dict | None:
        """Our fingerprint of the directory, or None for a directory holding nothing but our own leftovers.

        Anything else (foreign files, or a fingerprint.json we did not write) raises UserError."""
        stored = self.read_fingerprint()
        if stored is not None:
            return stored
        foreign = sorted(n for n in os.listdir(self.path) if not _is_leftover(n))
        if not foreign:
            return None
        why = (f"its {FINGERPRINT} lacks our \"written_by\": \"{WRITTEN_BY}\" mark (so do outputs of older "
               f"llm2vec-fast versions: delete such a directory yourself)"
               if FINGERPRINT in foreign else
               f"it holds {', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''} and no "
               f"{FINGERPRINT}")
        raise UserError(f"--output {self.path!r} is not empty and was not written by llm2vec-fast encode: {why}. "
                        f"It is left untouched, also with --overwrite (which deletes only files encode wrote). "
                        f"Choose a new or empty directory.")

    def read_fingerprint(self) -> dict | None:
        """The stored fingerprint if the directory has one written by us (WRITTEN_BY), else None."""
        try:
            with open(self.file(FINGERPRINT)) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            return None
        return stored if isinstance(stored, dict) and stored.get("written_by") == WRITTEN_BY else None

    def prepare(self, fingerprint: dict, overwrite: bool) -> None:
        """Create (or, with overwrite, clear our files from) the directory and store the fingerprint. Rank 0 only;
        `check` must have accepted the directory."""
        stamped = _stamped(fingerprint)
        with _write_errors(self.path):
            if overwrite and self.read_fingerprint() is not None:
                self._remove_our_files()
            # Files a killed run left under a temporary name are never trusted; clear them before anyone writes.
            # Every rank's probe is over by now: prepare runs after the process group's rendezvous.
            for directory in (self.path, self.file(SHARD_DIR), self.file(PROGRESS_DIR)):
                for name in os.listdir(directory) if os.path.isdir(directory) else ():
                    if _is_leftover(name):
                        os.remove(os.path.join(directory, name))
            # The fingerprint comes first: from now on every file here is recognisably ours.
            if self.read_fingerprint() != stamped:
                atomic_write(self.file(FINGERPRINT), json_bytes(stamped))
            for sub in (SHARD_DIR, PROGRESS_DIR):
                os.makedirs(self.file(sub), exist_ok=True)

    def _remove_our_files(self) -> None:
        # The index first, so that a kill half-way leaves an incomplete output rather than a complete-looking one;
        # then progress before shards, so that no shard still recorded as done loses its files. Files of other
        # names (the user's) are kept, and so are the subdirectories holding them.
        for name in (MANIFEST, LINE_NUMBERS):
            remove_if_present(self.file(name))
        for sub, pattern in ((PROGRESS_DIR, _PROGRESS_FILE), (SHARD_DIR, _SHARD_FILE)):
            directory = self.file(sub)
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if pattern.fullmatch(name) or _is_leftover(name):
                    os.remove(os.path.join(directory, name))
            if not os.listdir(directory):
                os.rmdir(directory)

    def is_complete(self) -> bool:
        """True when the run is finished: its manifest is written."""
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
        if self.output_format == "parquet":
            from . import parquet_shards

            try:
                return parquet_shards.num_rows(stem + parquet_shards.SUFFIX) == record["rows"]
            except (OSError, ValueError):  # pyarrow's errors derive from these
                return False
        try:
            embeddings = np.load(stem + ".npy", mmap_mode="r")
            lines = np.load(stem + ".lines.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        return embeddings.shape[0] == record["rows"] == lines.shape[0]

    def commit_shard(self, index: int, embeddings: np.ndarray, line_numbers: list[int], record: dict,
                     ids: list | None = None) -> None:
        """Write one shard's files, then record it in this rank's progress file. ids: the rows' --id-field values
        (Parquet output with id_kind only)."""
        stem = self.file(shard_stem(index))
        if self.output_format == "parquet":
            from . import parquet_shards

            atomic_write(stem + parquet_shards.SUFFIX,
                         parquet_shards.shard_bytes(embeddings, line_numbers, ids, self.id_kind),
                         before_rename=lambda: self._test_kill("temp"))
        else:
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
            files, lines = self._merge_shard_files(stem, dim, dtype)
            line_chunks.append(lines)
            shards.append({**files, "rows": record["rows"],
                           "row_start": row, "first_line": record["first_line"], "last_line": record["last_line"],
                           "input_sha256": record["input_sha256"]})
            skipped.extend({"line": line, "reason": reason} for line, reason in record["skipped"])
            row += record["rows"]
        line_numbers = np.concatenate(line_chunks) if line_chunks else np.zeros(0, dtype=np.int64)
        atomic_write(self.file(LINE_NUMBERS), npy_bytes(line_numbers.astype(np.int64)))
        manifest = dict(meta, count=row, shards=shards, skipped=skipped, line_numbers=LINE_NUMBERS,
                        output_format=self.output_format)
        atomic_write(self.file(MANIFEST), json_bytes(manifest))
        return manifest

    def _merge_shard_files(self, stem: str, dim: int, dtype: str) -> tuple[dict, np.ndarray]:
        """The manifest's file entries of one shard and its line numbers, after checking its embeddings' layout."""
        if self.output_format == "parquet":
            from . import parquet_shards

            name = stem + parquet_shards.SUFFIX
            layout = parquet_shards.embedding_layout(self.file(name))
            if layout != (dim, np.dtype(dtype)):
                raise RuntimeError(f"{name} has embeddings {layout}, expected ({dim}, {dtype})")
            return {"file": name}, parquet_shards.read_lines(self.file(name))
        embeddings = np.load(self.file(stem + ".npy"), mmap_mode="r")
        if embeddings.shape[1:] != (dim,) or embeddings.dtype != np.dtype(dtype):
            raise RuntimeError(f"{stem}.npy has shape {embeddings.shape} {embeddings.dtype}, expected "
                               f"[rows, {dim}] {dtype}")
        return {"file": stem + ".npy", "lines_file": stem + ".lines.npy"}, np.load(self.file(stem + ".lines.npy"))


def load_embeddings(output_dir: str, mmap: bool = False) -> tuple[np.ndarray | StackedRows, np.ndarray]:
    """Read a finished `llm2vec-fast encode` output.

    Returns (embeddings [N, dim] in the shard dtype, line_numbers int64 [N]): row i embeds input line (or table
    row) line_numbers[i], counted from 1. Rows are in input order; skipped lines are listed in manifest.json.
    mmap: return the embeddings as a `StackedRows` view over the memory-mapped .npy shards instead of one array:
    nothing is copied or read until rows are indexed (``view[i:j]``, ``view[ids]``); `np.asarray(view)` makes the
    full copy. Parquet output (--output-format parquet) is read whole into one array; mmap=True is refused for it
    (read it with pyarrow or datasets, which map it themselves; see the README).
    Every file read must lie inside output_dir (links included), and every shard must agree with the manifest
    and with line_numbers.npy; otherwise ValueError names the file.
    """
    manifest_path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{output_dir!r} has no {MANIFEST}: the encode run did not finish (re-run the same "
                                f"command to resume it) or this is not an llm2vec-fast encode output.")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        count, dim, dtype = int(manifest["count"]), int(manifest["dim"]), np.dtype(manifest["dtype"])
        shards = [_ShardEntry(s["file"], s.get("lines_file"), int(s["rows"]), int(s["row_start"]))
                  for s in manifest["shards"]]
        index_name = manifest["line_numbers"]
        output_format = manifest.get("output_format", "npy")  # outputs written before Parquet existed: npy
    except (ValueError, TypeError, KeyError) as error:
        raise _damaged(output_dir, f"{MANIFEST} is not a valid manifest ({error!r})") from None
    if output_format not in OUTPUT_FORMATS:
        raise _damaged(output_dir, f"{MANIFEST} names the output format {output_format!r}")
    if output_format == "parquet" and mmap:
        raise ValueError(f"{output_dir!r} holds Parquet shards, which cannot be memory-mapped as arrays; call "
                         f"load_embeddings without mmap (one copy in memory), or open the shards with pyarrow or "
                         f"datasets.load_dataset('parquet', ...), which map the files themselves.")
    root = os.path.realpath(output_dir)
    line_numbers = _load_array(root, index_name, output_dir)
    if line_numbers.shape != (count,) or line_numbers.dtype != np.int64:
        raise _damaged(output_dir, f"{index_name} holds {line_numbers.shape} {line_numbers.dtype}, expected "
                                   f"{count} int64 line numbers")
    parts, row = [], 0
    for shard in shards:
        if output_format == "parquet":
            embeddings, lines = _load_parquet_shard(root, shard.file, output_dir)
        else:
            embeddings = _load_array(root, shard.file, output_dir, "r" if mmap else None)
            lines = _load_array(root, shard.lines_file, output_dir)
        _check_shard(output_dir, shard, embeddings, lines, line_numbers, row, dim, dtype)
        parts.append(embeddings)
        row += len(lines)
    if row != count:
        raise _damaged(output_dir, f"the shards hold {row} rows, {MANIFEST} says {count}")
    if mmap:
        return StackedRows(parts, dim, dtype), line_numbers
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=dtype)
    return embeddings, line_numbers


def _inside(root: str, name, output_dir: str) -> str:
    """The path of file `name` (relative, as the manifest lists it), which must resolve to a file inside root."""
    if (not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")
            or not _is_inside(os.path.realpath(os.path.join(root, name)), root)):
        raise _damaged(output_dir, f"{MANIFEST} lists {name!r}, which is outside the output directory")
    return os.path.join(root, name)


def _load_parquet_shard(root: str, name, output_dir: str) -> tuple[np.ndarray, np.ndarray]:
    from . import parquet_shards

    path = _inside(root, name, output_dir)
    try:
        return parquet_shards.read_embeddings(path), parquet_shards.read_lines(path)
    except (OSError, ValueError, KeyError) as error:  # pyarrow's errors derive from OSError / ValueError
        raise _damaged(output_dir, f"{name} cannot be read ({error})") from None


def _load_array(root: str, name, output_dir: str, mmap_mode=None) -> np.ndarray:
    """The array in file `name` (relative, as the manifest lists it), which must resolve to a file inside root."""
    _inside(root, name, output_dir)
    try:
        return np.load(os.path.join(root, name), mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise _damaged(output_dir, f"{name} cannot be read ({error})") from None


def _is_inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


@dataclass(frozen=True)
class _ShardEntry:
    file: str
    lines_file: str | None  # None for a Parquet shard, which holds its line numbers
    rows: int
    row_start: int


def _check_shard(output_dir: str, shard: _ShardEntry, embeddings: np.ndarray, lines: np.ndarray,
                 line_numbers: np.ndarray, row: int, dim: int, dtype: np.dtype) -> None:
    """Refuse a shard whose shape, dtype, row count, position or line numbers disagree with the manifest and the
    index (line_numbers [count]); `row` is where the shard must start."""
    name, lines_name = shard.file, shard.lines_file or f"{shard.file}'s line column"
    if embeddings.ndim != 2 or embeddings.shape[1] != dim or embeddings.dtype != dtype:
        raise _damaged(output_dir, f"{name} holds {embeddings.shape} {embeddings.dtype}, expected [rows, {dim}] "
                                   f"{dtype}")
    if not embeddings.shape[0] == len(lines) == shard.rows or shard.row_start != row:
        raise _damaged(output_dir, f"{name} holds {embeddings.shape[0]} rows and {lines_name} {len(lines)}, "
                                   f"{MANIFEST} says {shard.rows} rows from row {shard.row_start} (expected from "
                                   f"row {row})")
    if not np.array_equal(lines, line_numbers[row:row + len(lines)]):
        raise _damaged(output_dir, f"{lines_name} does not match rows {row}..{row + len(lines) - 1} of "
                                   f"{LINE_NUMBERS}")


def _damaged(output_dir: str, problem: str) -> ValueError:
    return ValueError(f"{output_dir!r} cannot be trusted: {problem}. The output was changed after llm2vec-fast "
                      f"encode wrote it; re-run the encode command with --overwrite (or into a new --output).")


def _stamped(fingerprint: dict) -> dict:
    return dict(fingerprint, written_by=WRITTEN_BY)


def _is_leftover(name: str) -> bool:
    """A file a killed run of ours can leave behind: a write probe or a temporary file."""
    return name.startswith(_PROBE_MARK) or (name.startswith(".") and TEMP_MARK in name)


def _difference(key: str, stored, now) -> str:
    if isinstance(stored, dict) or isinstance(now, dict):
        stored, now = (value if isinstance(value, dict) else {} for value in (stored, now))
        changed = sorted(name for name in set(stored) | set(now) if stored.get(name) != now.get(name))
        return f"{key}: {', '.join(changed)} changed"
    if key.endswith("sha256"):
        return f"{key}: the content changed"
    return f"{key}: {stored!r} there, {now!r} now"


def _parse_test_kill(value: str | None):
    if not value:
        return None
    after, _, where = value.partition(":")
    return int(after), where or "recorded"
