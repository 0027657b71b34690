"""The output directory of `llm2vec-fast encode`, as the job writes it: shard files, per-rank progress,
fingerprint, merged index. (reader.py reads it back: `load_embeddings`.)

Layout (paths relative to the output directory; S = --shard-size; the names are in layout.py):

    fingerprint.json               the arguments and the sha256 of the input and of every model file the shards
                                   are computed from, marked "written_by": "llm2vec-fast encode"
    shards/shard-000007.npy        embeddings of the valid lines among input lines 7*S+1 .. 8*S, [rows, dim]
    shards/shard-000007.lines.npy  their input line numbers (int64, counted from 1)
    shards/shard-000007.parquet    instead of the two above with --output-format parquet: line numbers, ids
                                   (--id-field) and embeddings in one file (see parquet_shards.py)
    ranges.npy                     --precision int8/uint8 only: the per-dimension [min, max] float32 [2, dim] every
                                   shard is quantized with, written before the first shard (storage.py)
    progress/rank0.json            the shards rank 0 finished, with their skipped lines (rewritten atomically)
    manifest.json                  written last, once every shard is done: count, dim, dtype, model, pooling,
                                   the shards with their row ranges and the sha256 of each of their files, and
                                   every skipped line with its reason
    line_numbers.npy               the input line number of every output row (int64, [count])

A shard's files are those of its `ShardFormat` (shard_formats.py). Rows are in input order: shard by shard, line
by line. Every file is written to a temporary name, fsynced and renamed into place, and a shard counts as done only
once a progress file records it, so a run killed at any point leaves nothing half-written that a resumed run would
trust; the next run deletes the temporary files. The fault points "shard:N:temp|unrecorded|recorded" (faults.py)
kill a test run at each of those moments.

A directory is ours only if its fingerprint.json carries the WRITTEN_BY mark. We write into no other non-empty
directory, and --overwrite deletes only the files named above, in a directory that is ours.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import secrets
from contextlib import contextmanager

import numpy as np

from .. import faults
from ..errors import UserError
from ..output_lock import LOCK_FILE, OutputLock
from ..files import TEMP_MARK, create_exclusive, remove_if_present, sha256_file, write_atomic
from .fingerprint import fingerprint_differences
from .layout import FINGERPRINT, LINE_NUMBERS, MANIFEST, PROGRESS_DIR, RANGES, SHARD_DIR, WRITTEN_BY, shard_stem
from .reader import load_embeddings  # noqa: F401 (importable from here, as in earlier versions)
from .shard_formats import OUTPUT_FORMATS, all_formats, npy_bytes, shard_format

_SHARD_FILE = re.compile(r"shard-\d{6,}(" + "|".join(re.escape(suffix) for fmt in all_formats()
                                                    for suffix in fmt.suffixes) + ")")
_PROGRESS_FILE = re.compile(r"rank\d+\.json")
_PROBE_MARK = ".write-probe-"

__all__ = ["OUTPUT_FORMATS", "OutputDir", "atomic_write", "json_bytes", "load_embeddings", "npy_bytes",
           "shard_stem", "FINGERPRINT", "LINE_NUMBERS", "MANIFEST", "PROGRESS_DIR", "SHARD_DIR", "WRITTEN_BY"]


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
        self.shard_format = shard_format(output_format)
        self.id_kind = id_kind
        self._records: dict[int, dict] = {}
        self._committed = 0

    def file(self, name: str) -> str:
        """The path of `name` inside the output directory."""
        return os.path.join(self.path, name)

    # -------------------------------------------------------------------------------------------- setup

    def lock(self) -> OutputLock:
        """This rank's lock on the directory (created if needed), to hold while the run writes (output_lock.py).
        A directory encode did not write is refused first: not even a lock file of ours goes into it."""
        self._check_writable()
        self._check_no_links()
        self._stored_fingerprint()
        return OutputLock(self.path, self.rank, "llm2vec-fast encode")

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
        differences = fingerprint_differences(stored, now)
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
        for name in (FINGERPRINT, SHARD_DIR, PROGRESS_DIR, MANIFEST, LINE_NUMBERS, RANGES):
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
        foreign = sorted(n for n in os.listdir(self.path) if not _is_leftover(n) and not LOCK_FILE.fullmatch(n))
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
        for name in (MANIFEST, LINE_NUMBERS, RANGES):
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
        """True when the run is finished: its manifest is written (a file, never a planted link)."""
        return os.path.isfile(self.file(MANIFEST)) and not os.path.islink(self.file(MANIFEST))

    # ----------------------------------------------------------------------------------------- progress

    def completed(self) -> dict[int, dict]:
        """Shards recorded as done by any rank (of this run or an earlier one) whose files are in place.

        A progress file that is not whole (zero bytes or cut short, as a crash on a file system that lost its last
        write can leave it) or not ours records nothing: its shards count as not done and are encoded again, and
        the rank's next commit rewrites it whole."""

        def recorded(path: str) -> list[dict]:
            try:
                with open(path) as f:
                    shards = json.load(f)["shards"]
                if all(isinstance(r, dict) and isinstance(r["shard"], int) and isinstance(r["rows"], int)
                       and {"first_line", "last_line", "input_sha256", "skipped"} <= r.keys() for r in shards):
                    return shards
            except (OSError, ValueError, KeyError, TypeError):
                pass
            return []

        records = {}
        for path in sorted(glob.glob(self.file(f"{PROGRESS_DIR}/rank*.json"))):
            for record in recorded(path):
                records[record["shard"]] = record
        done = {k: r for k, r in records.items() if self._files_match(r)}
        own = self.file(f"{PROGRESS_DIR}/rank{self.rank}.json")
        if os.path.isfile(own):
            self._records = {r["shard"]: r for r in recorded(own) if r["shard"] in done}
        return done

    def _files_match(self, record: dict) -> bool:
        return self.shard_format.count(self.file(shard_stem(record["shard"]))) == record["rows"]

    def commit_shard(self, index: int, embeddings: np.ndarray, line_numbers: list[int], record: dict,
                     ids: list | None = None) -> None:
        """Write one shard's files, then record it in this rank's progress file. ids: the rows' --id-field values
        (Parquet output with id_kind only)."""
        stem = self.file(shard_stem(index))
        ordinal = self._committed + 1  # this process's count of shards, as the fault points count them
        files = self.shard_format.encode(embeddings, line_numbers, ids, self.id_kind)
        # Content hashes, recorded with the shard and carried into the manifest: load_embeddings checks them.
        digests = {os.path.basename(stem) + suffix: hashlib.sha256(data).hexdigest() for suffix, data in files}
        *first, (last_suffix, last_bytes) = files
        for suffix, data in first:
            atomic_write(stem + suffix, data)
        # The shard is in place once its last file is renamed into place.
        atomic_write(stem + last_suffix, last_bytes, before_rename=lambda: faults.point("shard", ordinal, "temp"))
        faults.point("shard", ordinal, "unrecorded")
        self._records[index] = dict(record, shard=index, rows=len(line_numbers), sha256=digests)
        shards = [self._records[k] for k in sorted(self._records)]
        atomic_write(self.file(f"{PROGRESS_DIR}/rank{self.rank}.json"), json_bytes({"rank": self.rank,
                                                                                    "shards": shards}))
        self._committed += 1
        faults.point("shard", ordinal, "recorded")

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
            files, lines = self._merge_shard_files(stem, dim, dtype, record.get("sha256"))
            line_chunks.append(lines)
            shards.append({**files, "rows": record["rows"],
                           "row_start": row, "first_line": record["first_line"], "last_line": record["last_line"],
                           "input_sha256": record["input_sha256"]})
            skipped.extend({"line": line, "reason": reason} for line, reason in record["skipped"])
            row += record["rows"]
        line_numbers = np.concatenate(line_chunks) if line_chunks else np.zeros(0, dtype=np.int64)
        index = npy_bytes(line_numbers.astype(np.int64))
        atomic_write(self.file(LINE_NUMBERS), index)
        manifest = dict(meta, count=row, shards=shards, skipped=skipped, line_numbers=LINE_NUMBERS,
                        line_numbers_sha256=hashlib.sha256(index).hexdigest(), output_format=self.output_format)
        atomic_write(self.file(MANIFEST), json_bytes(manifest))
        return manifest

    def _merge_shard_files(self, stem: str, dim: int, dtype: str, recorded: dict | None) -> tuple[dict, np.ndarray]:
        """The manifest's file entries of one shard (with each file's sha256) and its line numbers, after checking
        its embeddings' layout and that its files are the ones committed (`recorded`: their hashes, None for a
        shard an older version committed)."""
        fmt = self.shard_format
        problem = fmt.layout_problem(self.file(stem), stem, dim, dtype)
        if problem is not None:
            raise RuntimeError(problem)
        entry = fmt.manifest_entry(stem)
        digests = {}
        for suffix in fmt.suffixes:  # keyed as the manifest lists the files; the progress record by file name
            digests[stem + suffix] = sha256_file(self.file(stem + suffix))
            if recorded is not None and recorded.get(os.path.basename(stem) + suffix) != digests[stem + suffix]:
                raise UserError(f"{self.file(stem + suffix)} changed after it was committed (its sha256 differs from "
                                f"the progress record). Re-run with --overwrite to encode the input again.")
        return dict(entry, sha256=digests), fmt.read_lines(self.file(entry.get("lines_file", entry["file"])))


def _stamped(fingerprint: dict) -> dict:
    return dict(fingerprint, written_by=WRITTEN_BY)


def _is_leftover(name: str) -> bool:
    """A file a killed run of ours can leave behind: a write probe or a temporary file."""
    return name.startswith(_PROBE_MARK) or (name.startswith(".") and TEMP_MARK in name)
