"""`llm2vec-fast encode` on inputs a crash, a bad export or a hostile user leaves behind (issue 22): every bad input is
named before anything is encoded, as file:line (file:row) or file and row group, with the fix; a bad line is skipped
by --skip-bad-lines like any other; an output directory survives a broken progress file and never becomes part of
its own input; and a resume is not refused for options that only look different (a default stated explicitly,
--dtype auto resolved by another engine).

Classes of the failures these tests stand for: traceback (a raw RecursionError, OSError, ArrowInvalid, KeyError,
JSONDecodeError or UnicodeDecodeError), unclear error ("input 4" instead of file:line, found after shards were
written; the output's own shards read as input), false refusal (a resume refused for an identical run)."""

import json
import os

import numpy as np
import pytest

from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.encode_job.config import EncodeJobConfig
from llm2vec_fast.encode_job.corpus import InputSpec, parse_line, scan
from llm2vec_fast.encode_job.distributed import Ranks
from llm2vec_fast.encode_job.layout import MANIFEST
from llm2vec_fast.errors import UserError
from llm2vec_fast.lines import MAX_JSON_DEPTH, json_depth, parse_json_object
from encode_helpers import (assert_same_output, encode_args, error_of, private_hash_cache, reference,  # noqa: F401
                            texts, txt_file)

PARQUET = ("--output-format", "parquet")


def nothing_encoded(out) -> bool:
    """True when the run wrote no shard (it stopped before any work)."""
    return not (out / "shards").is_dir() or not os.listdir(out / "shards")


def skipped_lines(out) -> list[int]:
    return [s["line"] for s in json.loads((out / MANIFEST).read_text())["skipped"]]


def jsonl_with(tmp_path, texts, bad: dict[int, str]):
    """The corpus as JSONL, line n (from 1) replaced by bad[n] (the raw line)."""
    path = tmp_path / "corpus.jsonl"
    lines = [bad.get(n, json.dumps({"text": t})) for n, t in enumerate(texts, start=1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_rows_equal_reference_without(out, reference, missing: list[int]):
    embeddings, lines = load_embeddings(str(out))
    keep = ~np.isin(reference[1], missing)
    np.testing.assert_array_equal(lines, reference[1][keep])
    np.testing.assert_array_equal(embeddings, reference[0][keep])


# --------------------------------------------------------------------------------- 1. a lone surrogate (JSONL)

def test_a_jsonl_lone_surrogate_is_named_by_the_scan_and_skipped(llama_dir, texts, reference, tmp_path, capsys):
    """Unclear error: the tokenizer found it mid-run, after shards were written, as "input 4"."""
    path = jsonl_with(tmp_path, texts, {25: '{"text": "half a pair \\ud800 here"}'})
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, path, out), capsys)
    assert f"{path}:25: field 'text' holds a lone surrogate U+D800 at character 13" in err
    assert "--skip-bad-lines" in err and "input 4" not in err
    assert nothing_encoded(out)
    assert main(encode_args(llama_dir, path, out, "--skip-bad-lines")) == 0
    assert skipped_lines(out) == [25]
    assert_rows_equal_reference_without(out, reference, [25])


def test_a_lone_surrogate_in_an_instruction_is_a_bad_line():
    spec = InputSpec("x.jsonl", "jsonl")
    with pytest.raises(ValueError, match=r"field 'instruction' holds a lone surrogate U\+DC00 at character 2"):
        parse_line(b'{"text": "fine", "instruction": "q\\udc00"}', spec)
    assert parse_line(b'{"text": "a pair \\ud83d\\ude00"}', spec) == ("", "a pair \U0001F600")  # a real pair


def test_surrogate_bytes_in_a_txt_line_are_not_utf8(tmp_path):
    """A txt line cannot carry a lone surrogate: its UTF-8-like bytes (CESU-8) are refused as not UTF-8."""
    path = tmp_path / "c.txt"
    path.write_bytes(b"one\ntwo \xed\xa0\x80 three\nfour\n")
    result = scan(InputSpec(str(path), "txt"))
    assert result.num_lines == 3 and [b.line for b in result.bad] == [2]
    assert "not valid UTF-8 (byte 0xed at character 5)" in result.bad[0].reason


# ----------------------------------------------------------------------------------- 2. a 100k-deep JSON line

def test_a_100k_deep_json_line_is_a_named_bad_line(llama_dir, texts, reference, tmp_path, capsys):
    """Traceback: json's parser ended in a RecursionError."""
    path = jsonl_with(tmp_path, texts, {3: "[" * 100_000, 30: '{"text": "x", "meta": ' + "[" * 5000 + "]" * 5000
                                        + "}"})
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, path, out), capsys)
    assert f"{path}:3: JSON nested 100000 levels deep, deeper than the limit of {MAX_JSON_DEPTH}" in err
    assert f"{path}:30: JSON nested 5001 levels deep" in err and "2 bad line(s)" in err
    assert nothing_encoded(out)
    assert main(encode_args(llama_dir, path, out, "--skip-bad-lines")) == 0
    assert skipped_lines(out) == [3, 30]
    assert_rows_equal_reference_without(out, reference, [3, 30])


@pytest.mark.parametrize("line, depth", [
    ('{"text": "' + "[" * 500 + '"}', 1),  # brackets inside a string do not nest
    ('{"text": "a \\" [[[", "x": ' + "[" * 150 + "]" * 150 + "}", 151),  # an escaped quote does not end a string
    ('{"text": "\\\\", "x": ' + "{" * 120 + "}" * 120 + "}", 121),  # an escaped backslash does not escape the quote
    ('"' + "[" * 300, 0),  # an unterminated string runs to the end of the line
])
def test_json_depth_counts_only_brackets_outside_strings(line, depth):
    assert json_depth(line, limit=0) == depth


def test_json_nesting_up_to_the_limit_is_read():
    deep = '{"text": "t", "x": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_json_object(deep)["text"] == "t"
    with pytest.raises(ValueError, match=f"nested {MAX_JSON_DEPTH + 1} levels deep"):
        parse_json_object('{"text": "t", "x": ' + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "}")


# ------------------------------------------------------------------------ 3. truncated and corrupted tables

def test_a_truncated_datasets_arrow_file_is_named_before_any_work(llama_dir, texts, tmp_path, capsys):
    """Traceback: a raw pyarrow OSError ("Expected to be able to read ... bytes for message body")."""
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
    arrow = next(saved / n for n in os.listdir(saved) if n.endswith(".arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, saved, out), capsys)
    assert f"cannot read {arrow} (record batch 0, from row 1 of the file: Expected to be able to read" in err
    assert "truncated or corrupted" in err and "save the dataset again" in err and "Traceback" not in err
    assert nothing_encoded(out)


def corrupt_row_group(path, group: int) -> None:
    """Overwrite the middle of the first column chunk of row group `group` (its compressed pages)."""
    import pyarrow.parquet as pq

    chunk = pq.read_metadata(path).row_group(group).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20:start + chunk.total_compressed_size - 20] = b"\0" * (chunk.total_compressed_size - 40)
    path.write_bytes(bytes(data))


def test_a_corrupted_parquet_page_is_named_with_its_row_group(llama_dir, texts, tmp_path, capsys):
    """Traceback: a raw OSError ("Corrupt snappy compressed data") from pyarrow, in the middle of the scan."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10)
    corrupt_row_group(path, 2)
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, path, out), capsys)
    assert f"cannot read {path} (row group 2, rows 21-30 of the file: " in err
    assert "write it again from its source, or move it out of the --input directory" in err
    assert nothing_encoded(out)


def test_a_corrupted_parquet_page_with_a_checksum_is_refused_not_read(llama_dir, texts, tmp_path, capsys):
    """Silent wrong result: an uncompressed page with changed bytes decodes fine, into other texts; its CRC (which
    Spark and parquet-mr write by default) was not checked."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10, compression="none", use_dictionary=False,
                   write_page_checksum=True)
    chunk = pq.read_metadata(path).row_group(1).column(0)
    data = bytearray(path.read_bytes())
    end = chunk.data_page_offset + chunk.total_compressed_size
    data[end - 12:end - 7] = b"XXXXX"  # inside the last text of the page
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, path, out), capsys)
    assert f"cannot read {path} (row group 1, rows 11-20 of the file: " in err and "CRC checksum" in err
    assert nothing_encoded(out)


def test_a_parquet_text_that_is_not_utf8_is_a_bad_row(llama_dir, texts, reference, tmp_path, capsys):
    """Traceback: pyarrow's to_pylist raised UnicodeDecodeError (Parquet does not check UTF-8)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    values = [t.encode() for t in texts]
    values[6] = b"bad \xed\xa0\x80 bytes"
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    column = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                              pa.py_buffer(b"".join(values))])
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": column}), path, row_group_size=7)
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, path, out), capsys)
    assert f"{path}:7: text not valid UTF-8 (byte 0xed at byte 5); rewrite the column as UTF-8 text" in err
    assert nothing_encoded(out)
    assert main(encode_args(llama_dir, path, out, "--skip-bad-lines")) == 0
    assert skipped_lines(out) == [7]
    assert_rows_equal_reference_without(out, reference, [7])


# --------------------------------------------------------------- 4. files disagreeing on their columns

@pytest.fixture
def mixed_instruction_dir(tmp_path, texts):
    """A Parquet directory: part 0 with an instruction column, part 1 without, part 2 with one typed null (as pandas
    writes a column of None); the same records as JSONL."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "corpus"
    data.mkdir()
    instructions = [f"topic {i}:" if i % 2 == 0 else None for i in range(15)]
    pq.write_table(pa.table({"text": texts[:15], "instruction": instructions}), data / "part-0.parquet")
    pq.write_table(pa.table({"text": pa.array(texts[15:30], pa.large_string())}), data / "part-1.parquet")
    pq.write_table(pa.table({"text": texts[30:], "instruction": pa.nulls(15)}), data / "part-2.parquet")
    jsonl = tmp_path / "corpus.jsonl"
    records = [{"text": t, **({"instruction": q} if q else {})} for t, q in zip(texts, instructions + [None] * 30)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, jsonl


def test_a_parquet_file_without_the_instruction_column_has_no_instructions(llama_dir, mixed_instruction_dir,
                                                                            tmp_path):
    """Traceback: a KeyError (ArrowInvalid) for the files without the optional column."""
    data, jsonl = mixed_instruction_dir
    assert main(encode_args(llama_dir, data, tmp_path / "out", "--instruction", "default:")) == 0
    assert main(encode_args(llama_dir, jsonl, tmp_path / "jsonl", "--instruction", "default:")) == 0
    assert_same_output(tmp_path / "out", load_embeddings(str(tmp_path / "jsonl")))


def test_table_pieces_of_files_disagreeing_on_columns_concatenate(mixed_instruction_dir):
    """What a Ray read task gets (tables.read_piece): pieces of all three files in one layout, nulls where a file
    has no instruction."""
    import pyarrow as pa

    from llm2vec_fast.encode_job import tables

    data, _ = mixed_instruction_dir
    columns = tables.check_columns(str(data), "parquet", "text", "instruction", None)
    assert columns.instruction == "instruction" and len(columns.without_instruction) == 2
    counts = tables.file_row_counts(columns, "parquet")
    table = pa.concat_tables([tables.read_piece(columns, "parquet", p) for p in tables.pieces(columns, counts, 10, 35)])
    assert table.column_names == ["text", "instruction"] and table.num_rows == 25
    assert table.column("instruction").to_pylist() == ["topic 10:", None, "topic 12:", None, "topic 14:"] + [None] * 20


def test_parquet_files_disagreeing_on_the_text_type_are_named(llama_dir, texts, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "corpus"
    data.mkdir()
    pq.write_table(pa.table({"text": texts[:20]}), data / "part-0.parquet")
    pq.write_table(pa.table({"text": list(range(25))}), data / "part-1.parquet")
    err = error_of(encode_args(llama_dir, data, tmp_path / "out"), capsys)
    assert f"{data / 'part-1.parquet'}: column 'text' is int64, expected strings; cast it to string" in err


# ---------------------------------------------------------------------------- 5. a broken progress file

@pytest.mark.parametrize("content", [b"", b'{"rank": 0, "shards": [{"shard": 0, "ro', b"[1, 2]",
                                     b'{"shards": [{"shard": "0"}]}'],
                         ids=["zero-bytes", "cut-short", "not-an-object", "not-a-record"])
def test_a_broken_progress_file_is_as_if_absent_and_the_run_resumes(llama_dir, txt_file, reference, tmp_path,
                                                                     content):
    """Traceback: a JSONDecodeError at every later run, so the output could never be resumed."""
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    for name in (MANIFEST, "line_numbers.npy", "shards/shard-000004.npy", "shards/shard-000004.lines.npy"):
        os.remove(out / name)  # a crash before the last shard was recorded...
    (out / "progress" / "rank0.json").write_bytes(content)  # ...that also lost the progress file's content
    assert main(encode_args(llama_dir, txt_file, out)) == 0  # its shards are encoded again
    assert_same_output(out, reference)
    recorded = json.loads((out / "progress" / "rank0.json").read_text())["shards"]
    assert [r["shard"] for r in recorded] == [0, 1, 2, 3, 4]


# ------------------------------------------------------------------ 6. an output inside its input directory

def test_an_output_inside_its_parquet_input_directory_is_not_input(llama_dir, texts, reference, tmp_path, capsys):
    """Unclear error: every re-run read the output's own shards and failed ("shard-000000.parquet has no column
    'text'")."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "corpus"
    data.mkdir()
    pq.write_table(pa.table({"text": texts}), data / "corpus.parquet", row_group_size=7)
    out = data / "embeddings"
    args = encode_args(llama_dir, data, out, *PARQUET)
    assert main(args) == 0
    assert_same_output(out, reference)
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert [name for name, _ in fingerprint["input_files"]] == ["corpus.parquet"]
    capsys.readouterr()
    assert main(args) == 0  # the re-run of a finished output
    assert "already complete" in capsys.readouterr().err
    for name in (MANIFEST, "shards/shard-000004.parquet"):
        os.remove(out / name)
    assert main(args) == 0  # the resume of an interrupted one
    assert_same_output(out, reference)
    assert main(args + ["--overwrite"]) == 0
    assert_same_output(out, reference)


def test_an_output_alone_in_its_input_directory_leaves_no_input(llama_dir, texts, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = tmp_path / "corpus"
    data.mkdir()
    pq.write_table(pa.table({"text": texts}), data / "corpus.parquet")
    out = data / "embeddings"
    assert main(encode_args(llama_dir, data, out, *PARQUET)) == 0
    os.remove(data / "corpus.parquet")
    err = error_of(encode_args(llama_dir, data, out, *PARQUET), capsys)
    assert "neither .parquet files nor a datasets state.json" in err


# --------------------------------------------------------------------------------- 7. no false refusals

@pytest.mark.parametrize("first, then", [((), ("--pooling", "mean")), (("--pooling", "mean"), ())],
                         ids=["default-then-stated", "stated-then-default"])
def test_a_resume_stating_the_default_pooling_is_not_refused(llama_dir, txt_file, reference, tmp_path, first, then):
    """False refusal: "pooling: None there, 'mean' now"."""
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out, *first)) == 0
    for name in (MANIFEST, "shards/shard-000003.npy", "shards/shard-000004.npy"):
        os.remove(out / name)  # interrupted: the resume compares fingerprints and encodes the rest
    assert main(encode_args(llama_dir, txt_file, out, *then)) == 0
    assert_same_output(out, reference)


def job_config(engine: str, dtype: str = "auto") -> EncodeJobConfig:
    return EncodeJobConfig(input="x.parquet", output="out", engine=engine, dtype=dtype, device="cpu")


def test_dtype_auto_resolves_to_what_the_output_records_on_every_engine(llama_dir, set_env):
    """False refusal: a Ray run's output (auto resolved to float32 there) resumed by the local engine, which
    resolved auto to mixed on this CPU."""
    from llm2vec_fast.encode_job.job import resolved_dtype

    ranks = Ranks(0, 1, 0)
    set_env(LLM2VEC_FAST_CPU_DTYPE="mixed")  # a CPU where the local engine's auto picks mixed
    assert resolved_dtype(job_config("local"), str(llama_dir), ranks) == "mixed"  # a new output: this machine's
    assert resolved_dtype(job_config("ray"), str(llama_dir), ranks) == "float32"  # a new output: the workers'
    for engine in ("local", "ray"):  # a resume: what the output records, whichever engine started it
        assert resolved_dtype(job_config(engine), str(llama_dir), ranks, recorded="float32") == "float32"
        assert resolved_dtype(job_config(engine), str(llama_dir), ranks, recorded="bfloat16") == "bfloat16"
        # An explicit dtype is the user's: a different recorded one is refused by the fingerprint, not replaced.
        assert resolved_dtype(job_config(engine, "float16"), str(llama_dir), ranks, recorded="float32") == "float16"
    assert resolved_dtype(job_config("local"), str(llama_dir), ranks, recorded="mixed") == "mixed"
    with pytest.raises(UserError, match="resolved to 'mixed', which --engine ray cannot run; resume it with "
                                        "--engine local"):
        resolved_dtype(job_config("ray"), str(llama_dir), ranks, recorded="mixed")
    set_env(LLM2VEC_FAST_CPU_DTYPE="float32")
    # Hugging Face's "auto" (a GPU's checkpoint dtype) is no dtype to run again on a CPU: chosen afresh.
    assert resolved_dtype(job_config("local"), str(llama_dir), ranks, recorded="auto") == "float32"


def test_an_output_started_in_float32_resumes_under_dtype_auto(llama_dir, txt_file, reference, tmp_path, set_env):
    """The output a Ray run leaves under --dtype auto (its fingerprint records float32; the engine is not part of
    it), resumed by the local engine under --dtype auto on a CPU where auto picks mixed: accepted, and continued in
    float32, bitwise equal to an uninterrupted float32 run."""
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out, "--dtype", "float32")) == 0
    for name in (MANIFEST, "shards/shard-000002.npy", "shards/shard-000003.npy", "shards/shard-000004.npy"):
        os.remove(out / name)
    set_env(LLM2VEC_FAST_CPU_DTYPE="mixed")
    assert main(encode_args(llama_dir, txt_file, out, "--dtype", "auto")) == 0
    assert_same_output(out, reference)
    assert json.loads((out / MANIFEST).read_text())["model_dtype"] == "float32"
    assert main(encode_args(llama_dir, txt_file, tmp_path / "new", "--dtype", "auto")) == 0  # a new output: mixed
    assert json.loads((tmp_path / "new" / MANIFEST).read_text())["model_dtype"] == "mixed"


def test_a_ray_output_resumed_by_the_local_engine_under_dtype_auto(llama_dir, texts, reference, tmp_path, set_env):
    """False refusal, end to end: `encode --engine ray --dtype auto` (float32 there), interrupted, then resumed by
    the local engine under --dtype auto on a CPU where auto picks mixed ("dtype: 'float32' there, 'mixed' now")."""
    ray = pytest.importorskip("ray")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=7)
    out = tmp_path / "out"
    set_env(OMP_NUM_THREADS="1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(encode_args(llama_dir, path, out, "--engine", "ray", "--ray-actors", "1", "--dtype", "auto")) == 0
    finally:
        ray.shutdown()
    assert json.loads((out / "fingerprint.json").read_text())["dtype"] == "float32"
    for name in (MANIFEST, "shards/shard-000003.npy", "shards/shard-000004.npy"):
        os.remove(out / name)
    set_env(LLM2VEC_FAST_CPU_DTYPE="mixed")
    assert main(encode_args(llama_dir, path, out, "--dtype", "auto")) == 0
    assert_same_output(out, reference)
