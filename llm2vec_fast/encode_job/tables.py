"""Reading Arrow tables as an encode corpus: a Parquet file, a directory of Parquet files, or a directory written by
`datasets.Dataset.save_to_disk` (what `datasets.load_from_disk` reads).

Rows are numbered from 1 in table order (the files in sorted path order, a `datasets` directory's files in the order
its state.json lists them, then row by row) and play the part of line numbers: shard k holds rows k*S+1 .. (k+1)*S,
the output's line numbers are these row numbers, and a bad row (a null, empty or whitespace-only text, a null id) is
reported as ``input:N: reason`` and handled as a bad line (refused, or skipped and listed with --skip-bad-lines).
Nothing is dropped or reordered silently.

The optional --instruction-field column may be missing from some files of a directory: their rows have no
instruction of their own (as a null would), and a column all of nulls (typed null by pandas) is no column of
instructions. A file that cannot be read (a truncated Arrow file, a corrupted Parquet page; pages with a CRC are
checked against it) stops the run while the input is scanned, before anything is encoded, with an error naming the
file, the row group (batch) and the fix; a text that is not valid UTF-8 is a bad row. An output directory inside a Parquet input directory is not part of the
input.

Only the columns named by --text-field, --instruction-field (if the table has it) and --id-field are read, in
record batches of at most BATCH_ROWS rows, so memory stays bounded by one shard (plus the row group pyarrow is
decoding) whatever the table's size.
pyarrow is imported only when such an input is used: the base install does not need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..choices import TABLE_FORMATS
from ..errors import UserError

PARQUET_SUFFIXES = (".parquet", ".pq")
BATCH_ROWS = 8192
# What `Dataset.save_to_disk` writes beside its Arrow files; a DatasetDict directory has DATASET_DICT instead.
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"


def pyarrow():
    """The pyarrow module, or a UserError naming the extra that installs it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 (pa.parquet is used below)
    except ImportError:
        raise UserError("reading or writing Parquet and datasets directories needs pyarrow: "
                        "pip install 'llm2vec-fast[parquet]'.") from None
    return pa


def table_format(path: str, exclude: str | None = None) -> str | None:
    """"parquet" or "dataset" when `path` looks like such an input (by its extension or its files), else None.
    exclude: a directory whose files are not the input's (the run's output)."""
    if os.path.isfile(path):
        return "parquet" if path.lower().endswith(PARQUET_SUFFIXES) else None
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, DATASET_STATE)) or os.path.isfile(os.path.join(path, DATASET_DICT)):
        return "dataset"
    return "parquet" if _parquet_files(path, exclude) else None


@dataclass(frozen=True)
class TableColumns:
    """The columns an encode run reads from a table and their types, checked against every file.

    instruction: the --instruction-field column when some file has it (optional, as in JSONL), else None.
    without_instruction: the files that lack it (their rows have no instruction of their own).
    id_kind: "int64" or "string" (how ids are stored in Parquet output), None without --id-field.
    """

    files: list[str]
    text: str
    instruction: str | None
    id: str | None
    id_kind: str | None
    without_instruction: frozenset = frozenset()

    @property
    def names(self) -> list[str]:
        """The column names to read, in a fixed order: text, then instruction and id when present."""
        return [c for c in (self.text, self.instruction, self.id) if c is not None]

    def names_in(self, file: str) -> list[str]:
        """The columns of `names` that data file `file` has (all but the instruction for the files without it)."""
        return [c for c in self.names if not (c == self.instruction and file in self.without_instruction)]


def table_files(path: str, fmt: str, exclude: str | None = None) -> list[str]:
    """The data files of a table input, in row order; UserError if there are none or the layout is not ours.
    exclude: a directory whose files are not the input's (the run's output, when it lies inside the input)."""
    if fmt == "parquet":
        if os.path.isfile(path):
            return [path]
        files = _parquet_files(path, exclude)
        if not files:
            raise UserError(f"--input {path!r} holds no .parquet files; pass a Parquet file or a directory of them.")
        return files
    if os.path.isfile(os.path.join(path, DATASET_DICT)):
        with open(os.path.join(path, DATASET_DICT)) as f:
            splits = json.load(f).get("splits", [])
        raise UserError(f"--input {path!r} is a DatasetDict (splits: {', '.join(splits) or 'none'}); pass one split's "
                        f"directory, e.g. --input {os.path.join(path, splits[0] if splits else 'train')}.")
    state_path = os.path.join(path, DATASET_STATE)
    try:
        with open(state_path) as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--input {path!r} is not a directory written by datasets' save_to_disk ({state_path}: "
                        f"{error!r}); pass --format parquet for a directory of Parquet files.") from None
    files = [os.path.join(path, name) for name in names]
    for name, file in zip(names, files):
        if os.path.basename(name) != name or not os.path.isfile(file):
            raise UserError(f"{state_path} lists {name!r}, which is not a file of {path!r}; save the dataset again.")
    return files


def _parquet_files(directory: str, exclude: str | None = None) -> list[str]:
    # Hidden and underscore files are writers' metadata (_SUCCESS, _common_metadata, .crc): not data. Nor is
    # anything under `exclude`: an encode output inside its input directory holds Parquet shards of its own, which
    # would otherwise join the input of every later run (and change its fingerprint).
    excluded = None if exclude is None else os.path.realpath(exclude)
    if _inside(directory, excluded):
        excluded = None  # an input inside its output directory: all of it is input (the output check decides)
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_"))
                         and not _inside(os.path.join(root, d), excluded))
        found += [os.path.join(root, n) for n in names
                  if n.lower().endswith(PARQUET_SUFFIXES) and not n.startswith((".", "_"))
                  and not _inside(os.path.join(root, n), excluded)]
    return sorted(found, key=lambda p: os.path.relpath(p, directory).split(os.sep))


def _inside(path: str, directory: str | None) -> bool:
    """Whether `path` is `directory` (a real path) or lies under it, links resolved."""
    if directory is None:
        return False
    real = os.path.realpath(path)
    return real == directory or real.startswith(directory.rstrip(os.sep) + os.sep)


def _schema(file: str, fmt: str):
    pa = pyarrow()
    try:
        if fmt == "parquet":
            return pa.parquet.read_schema(file)
        with pa.memory_map(file) as source:
            return pa.ipc.open_stream(source).schema
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"cannot read {file} as {'Parquet' if fmt == 'parquet' else 'an Arrow stream'} ({error}); "
                        f"{_fix(fmt)}.") from None


def _fix(fmt: str) -> str:
    """What to do about a data file that cannot be read."""
    if fmt == "parquet":
        return ("the file is truncated or corrupted: write it again from its source, or move it out of the --input "
                "directory")
    return ("the file is truncated or corrupted: save the dataset again (Dataset.save_to_disk), or restore the "
            "directory from a copy")


@contextmanager
def _reading(file: str, fmt: str, where: str):
    """Context manager: pyarrow's read errors (OSError, ArrowInvalid...) as a UserError naming the file, `where`
    in it (a row group or batch), and the fix."""
    pa = pyarrow()
    try:
        yield
    except (OSError, pa.ArrowException) as error:
        reason = " ".join(str(error).split()).rstrip(".")  # pyarrow's messages may span lines
        raise UserError(f"cannot read {file} ({where}: {reason}); {_fix(fmt)}. Nothing was encoded.") from None


def check_columns(path: str, fmt: str, text_field: str, instruction_field: str, id_field: str | None,
                  exclude: str | None = None) -> TableColumns:
    """The columns to read, after checking in every file that they exist and have usable types (UserError naming
    the file, the column, its type and the fix otherwise). exclude: a directory whose files are not the input's.

    The instruction column is optional in each file: a file without it (or with a column of nulls only) has rows
    without instructions of their own."""
    pa = pyarrow()
    files = table_files(path, fmt, exclude)
    instruction, id_kind, id_type, without_instruction = None, None, None, set()
    for file in files:
        schema = _schema(file, fmt)
        where = file if len(files) > 1 or file != path else path
        if text_field not in schema.names:
            raise UserError(f"{where} has no column {text_field!r} (columns: {', '.join(map(repr, schema.names))}); "
                            f"pass --text-field with the column holding the texts.")
        _check_text_type(pa, schema.field(text_field).type, where, text_field, "--text-field")
        if instruction_field in schema.names and not pa.types.is_null(schema.field(instruction_field).type):
            _check_text_type(pa, schema.field(instruction_field).type, where, instruction_field, "--instruction-field")
            instruction = instruction_field
        else:
            without_instruction.add(file)
        if id_field is not None:
            if id_field not in schema.names:
                raise UserError(f"{where} has no column {id_field!r} (columns: {', '.join(map(repr, schema.names))});"
                                f" pass --id-field with the column holding the ids, or leave it out to use row "
                                f"numbers.")
            field_type = schema.field(id_field).type
            kind = _id_kind(pa, field_type)
            if kind is None:
                raise UserError(f"{where}: column {id_field!r} is {field_type}; --id-field needs integer (at most "
                                f"int64) or string ids. Cast the column, or leave --id-field out to use row numbers.")
            if id_type is not None and field_type != id_type:
                raise UserError(f"{where}: column {id_field!r} is {field_type}, an earlier file has {id_type}; cast "
                                f"the ids to one type in every file.")
            id_kind, id_type = kind, field_type
    return TableColumns(files, text_field, instruction, id_field, id_kind,
                        frozenset(without_instruction) if instruction is not None else frozenset())


def _check_text_type(pa, field_type, where: str, column: str, option: str) -> None:
    if _is_text(pa, field_type):
        return
    raise UserError(f"{where}: column {column!r} is {field_type}, expected strings; cast it to string or pass "
                    f"{option} with a string column.")


def _is_text(pa, field_type) -> bool:
    if pa.types.is_dictionary(field_type):
        field_type = field_type.value_type
    return (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(field_type))


def _id_kind(pa, field_type) -> str | None:
    if pa.types.is_integer(field_type) and field_type != pa.uint64():
        return "int64"
    return "string" if _is_text(pa, field_type) else None


def _batches(columns: TableColumns, fmt: str) -> Iterator:
    """Record batches of the wanted columns of every file in order, at most BATCH_ROWS rows each (a file without
    the instruction column gets one of nulls). A file that cannot be read is a UserError naming it and where."""
    pa = pyarrow()
    for file in columns.files:
        names = columns.names_in(file)
        if fmt == "parquet":
            with _reading(file, fmt, "its footer"):
                parquet = _parquet_file(pa, file)
            first = 1  # the file's first row in this row group, counted from 1
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                where = f"row group {group}, rows {first}-{first + rows - 1} of the file"
                with _reading(file, fmt, where):
                    reader = parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=names)
                while True:
                    with _reading(file, fmt, where):
                        batch = next(reader, None)
                    if batch is None:
                        break
                    yield _with_all_columns(pa, batch, columns)
                first += rows
            continue
        # datasets' Arrow files are IPC streams; memory-mapped, a batch costs nothing until its columns are read.
        with pa.memory_map(file) as source:
            with _reading(file, fmt, "its schema"):
                reader = iter(pa.ipc.open_stream(source))
            number, first = 0, 1
            while True:
                with _reading(file, fmt, f"record batch {number}, from row {first} of the file"):
                    batch = next(reader, None)
                if batch is None:
                    break
                batch = _with_all_columns(pa, batch.select(names), columns)
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    yield batch.slice(start, BATCH_ROWS)
                number, first = number + 1, first + batch.num_rows


def _parquet_file(pa, file: str):
    # Pages whose writer stored a CRC (Spark and parquet-mr do by default) are checked against it: a corrupted page
    # that still decompresses, or was never compressed, is then an error instead of silently wrong texts.
    return pa.parquet.ParquetFile(file, page_checksum_verification=True)


def _with_all_columns(pa, batch, columns: TableColumns):
    """`batch` with a column of nulls for the instruction column when its file has none (as the rows of a file
    that has it but holds null there)."""
    if columns.instruction is None or columns.instruction in batch.schema.names:
        return batch
    arrays = {name: batch.column(name) for name in batch.schema.names}
    arrays[columns.instruction] = pa.nulls(batch.num_rows, pa.string())
    return pa.RecordBatch.from_arrays([arrays[name] for name in columns.names], names=columns.names)


@dataclass
class TableShard:
    """The rows of one shard of a table input: index, last row number, sha256 of its values, and its columns as
    Python lists (texts, instructions or None, ids or None) in row order."""

    index: int
    last_line: int
    sha256: str
    texts: list
    instructions: list | None
    ids: list | None


def read_table_shards(columns: TableColumns, fmt: str, shard_size: int, wanted: Callable[[int], bool],
                      on_end: Callable[[int], None] | None = None) -> Iterator[TableShard]:
    """The shards whose index `wanted` accepts, in order; other shards' rows are only counted.

    on_end: called with the number of rows once the input is exhausted."""
    pending: list = []  # record batch slices of the shard being gathered
    index, row = 0, 0
    for batch in _batches(columns, fmt):
        start = 0
        while start < batch.num_rows:
            index = row // shard_size
            take = min(batch.num_rows - start, (index + 1) * shard_size - row)
            if wanted(index):
                pending.append(batch.slice(start, take))
            start += take
            row += take
            if row % shard_size == 0 and pending:
                yield _shard(columns, index, row, pending)
                pending = []
    if pending:
        yield _shard(columns, index, row, pending)
    if on_end is not None:
        on_end(row)


def _shard(columns: TableColumns, index: int, last_row: int, batches: list) -> TableShard:
    def column(name, values=lambda array: array.to_pylist()):
        return None if name is None else [v for b in batches for v in values(b.column(name))]

    texts, instructions = column(columns.text, _texts), column(columns.instruction, _texts)
    ids = column(columns.id)
    digest = hashlib.sha256()
    for i, text in enumerate(texts):
        values = [text, None if instructions is None else instructions[i], None if ids is None else ids[i]]
        digest.update(json.dumps([_json_value(v) for v in values], ensure_ascii=False).encode() + b"\n")
    return TableShard(index, last_row, digest.hexdigest(), texts, instructions, ids)


@dataclass(frozen=True)
class NotUtf8:
    """Stands for a string value whose bytes are not UTF-8 (Parquet does not check; pyarrow fails on it): its bytes
    and the offset of the first bad one."""

    data: bytes
    start: int

    @property
    def reason(self) -> str:
        """Why the value cannot be encoded, and the fix."""
        return (f"not valid UTF-8 (byte 0x{self.data[self.start]:02x} at byte {self.start + 1}); rewrite the column "
                f"as UTF-8 text")


def _texts(array) -> list:
    """The values of a string column as Python str (or None), a value that is not UTF-8 as a NotUtf8."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        pass
    pa = pyarrow()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return [None if value is None else _decoded(value) for value in array.cast(pa.large_binary()).to_pylist()]


def _decoded(value: bytes):
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        return NotUtf8(value, error.start)


def _json_value(value):
    # What stands for a NotUtf8 in a shard's hash: its bytes, which no str value can be mistaken for.
    return {"not_utf8": value.data.hex()} if isinstance(value, NotUtf8) else value


def row_problem(text, row_id, id_wanted: bool, instruction=None) -> str | None:
    """Why a row cannot be encoded ("null text", "empty text", "whitespace-only text", "null id", a text or
    instruction that is not UTF-8), or None."""
    if text is None:
        return "null text"
    if isinstance(text, NotUtf8):
        return f"text {text.reason}"
    if isinstance(instruction, NotUtf8):
        return f"instruction {instruction.reason}"
    if not text.strip():
        return "empty text" if not text else "whitespace-only text"
    if id_wanted and row_id is None:
        return "null id"
    return None


@dataclass(frozen=True)
class FilePiece:
    """Rows [start, stop) of one data file (counted from 0 within the file)."""

    file: str
    start: int
    stop: int


def file_row_counts(columns: TableColumns, fmt: str) -> list[int]:
    """The number of rows of each data file, in order: Parquet footers, or a pass over a memory-mapped Arrow
    stream's batch headers (no column is read)."""
    pa = pyarrow()
    counts = []
    for file in columns.files:
        with _reading(file, fmt, "its footer" if fmt == "parquet" else "its record batches"):
            if fmt == "parquet":
                counts.append(pa.parquet.read_metadata(file).num_rows)
            else:
                with pa.memory_map(file) as source:
                    counts.append(sum(batch.num_rows for batch in pa.ipc.open_stream(source)))
    return counts


def pieces(columns: TableColumns, counts: list[int], start: int, stop: int) -> list[FilePiece]:
    """The file pieces holding global rows [start, stop) (counted from 0), in order; counts: file_row_counts."""
    found, offset = [], 0
    for file, n in zip(columns.files, counts):
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            found.append(FilePiece(file, a - offset, b - offset))
        offset += n
    return found


def read_piece(columns: TableColumns, fmt: str, piece: FilePiece):
    """The wanted columns of one file piece as a pyarrow Table; only the row groups (or stream batches) that
    overlap the piece are read.

    Pieces of different files concatenate: the text and instruction columns come as large_string, a file without
    the instruction column gets one of nulls, and a row whose text or instruction is not UTF-8 (a bad row of the
    scan) comes with a null text and instruction, so that whoever drops null texts drops it too."""
    pa = pyarrow()
    names = columns.names_in(piece.file)
    where = f"rows {piece.start + 1}-{piece.stop} of the file"
    if fmt == "parquet":
        with _reading(piece.file, fmt, where):
            parquet = _parquet_file(pa, piece.file)
            groups, first, offset = [], None, 0
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if offset < piece.stop and offset + n > piece.start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = parquet.read_row_groups(groups, columns=names)
        return _uniform(pa, table.slice(piece.start - first, piece.stop - piece.start), columns)
    kept, offset = [], 0
    with pa.memory_map(piece.file) as source, _reading(piece.file, fmt, where):
        for batch in pa.ipc.open_stream(source):
            a, b = max(piece.start, offset), min(piece.stop, offset + batch.num_rows)
            if a < b:
                kept.append(batch.select(names).slice(a - offset, b - a))
            offset += batch.num_rows
        # Copied out of the map before it closes: the table travels to another process.
        return _uniform(pa, pa.Table.from_batches(kept).combine_chunks(), columns)  # pieces() makes no empty piece


def _uniform(pa, table, columns: TableColumns):
    """`table` (one file piece) in the column layout every piece shares (see read_piece)."""
    import pyarrow.compute  # noqa: F401 (pa.compute below)

    text_columns = [c for c in (columns.text, columns.instruction) if c is not None]
    if columns.instruction is not None and columns.instruction not in table.column_names:
        table = table.append_column(columns.instruction, pa.nulls(table.num_rows, pa.large_string()))
    invalid = None
    for name in text_columns:
        try:
            table.column(name).validate(full=True)
        except pa.ArrowInvalid:  # a value that is not UTF-8
            bad = [isinstance(v, NotUtf8) for v in _texts(table.column(name).combine_chunks())]
            invalid = bad if invalid is None else [x or y for x, y in zip(invalid, bad)]
    arrays = {}
    for name in table.column_names:
        column = table.column(name)
        if name in text_columns:
            column = column.combine_chunks()
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            if invalid is not None:
                column = pa.compute.if_else(pa.array(invalid, pa.bool_()), pa.scalar(None, pa.large_binary()),
                                            column.cast(pa.large_binary()))
            column = column.cast(pa.large_string())
        arrays[name] = column
    return pa.table([arrays[name] for name in columns.names], names=columns.names)
