"""encode on Arrow tables (llm2vec_fast/encode_job/tables.py, parquet_shards.py): Parquet files and directories and
`datasets` save_to_disk directories in, Parquet shards out, with the .npy path's resume and fingerprints; the
memory-mapped `load_embeddings` view (stacked.py); the README's datasets and FAISS one-liners."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from llm2vec_fast.cli import main  # noqa: E402
from llm2vec_fast.encode_job import load_embeddings  # noqa: E402
from llm2vec_fast.encode_job.layout import MANIFEST  # noqa: E402
from llm2vec_fast.faults import VARIABLE as FAULT_ENV  # noqa: E402
from llm2vec_fast.encode_job.stacked import StackedRows  # noqa: E402
from encode_helpers import (N_LINES, SHARD, assert_same_output, encode_args, private_hash_cache,  # noqa: E402,F401
                            reference, subprocess_env, texts, txt_file)

PARQUET = ("--output-format", "parquet")


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory, texts):
    """The reference corpus as a Parquet file with string ids and small row groups (batches cross shards)."""
    path = tmp_path_factory.mktemp("tables") / "corpus.parquet"
    table = pa.table({"doc_id": [f"d{i:03d}" for i in range(N_LINES)], "text": texts, "n": list(range(N_LINES))})
    pq.write_table(table, path, row_group_size=7)
    return str(path)


def read_parquet_output(out):
    """(line, id or None, embeddings) of a Parquet output, read with pyarrow in file-name order."""
    files = sorted((out / "shards").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    embeddings = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return table.column("line").to_pylist(), ids, embeddings


def test_parquet_in_npy_out_equals_the_txt_run(llama_dir, parquet_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, parquet_file, out)) == 0
    assert_same_output(out, reference)
    assert json.loads((out / MANIFEST).read_text())["format"] == "parquet"


def test_parquet_output_holds_lines_ids_and_embeddings(llama_dir, parquet_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, parquet_file, out, *PARQUET, "--id-field", "doc_id")) == 0
    assert sorted(os.listdir(out / "shards")) == [f"shard-{k:06d}.parquet" for k in range(5)]
    schema = pq.read_schema(out / "shards" / "shard-000000.parquet")
    assert schema.names == ["line", "id", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    lines, ids, embeddings = read_parquet_output(out)
    assert lines == list(range(1, N_LINES + 1)) and ids == [f"d{i:03d}" for i in range(N_LINES)]
    np.testing.assert_array_equal(embeddings, reference[0])
    assert_same_output(out, reference)  # load_embeddings reads Parquet output too


def test_parquet_directory_in_file_order_and_integer_ids(llama_dir, texts, reference, tmp_path):
    # Rows follow the files' sorted relative paths (subdirectories included), as Parquet writers name them.
    data = tmp_path / "corpus"
    (data / "z").mkdir(parents=True)
    cuts = [0, 12, 30, N_LINES]
    for k, (a, b) in enumerate(zip(cuts, cuts[1:])):
        where = data / ("z" if k == 2 else "") / f"part-{k:02d}.parquet"
        pq.write_table(pa.table({"text": texts[a:b], "id": pa.array(range(a, b), pa.int32())}), where)
    (data / "_SUCCESS").write_text("")
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, str(data), out, *PARQUET, "--id-field", "id")) == 0
    lines, ids, embeddings = read_parquet_output(out)
    assert ids == list(range(N_LINES)) and lines == list(range(1, N_LINES + 1))
    assert pq.read_schema(out / "shards" / "shard-000000.parquet").field("id").type == pa.int64()
    np.testing.assert_array_equal(embeddings, reference[0])


def test_datasets_directory_with_instructions(llama_dir, texts, tmp_path):
    datasets = pytest.importorskip("datasets")
    from llm2vec_fast import LLM2Vec

    instructions = [f"topic {i}:" if i % 3 == 0 else None for i in range(N_LINES)]
    saved = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": texts, "query": instructions}).save_to_disk(str(saved), max_shard_size="2KB")
    assert len([n for n in os.listdir(saved) if n.endswith(".arrow")]) > 1  # several files, read in state.json order
    out = tmp_path / "out"
    args = encode_args(llama_dir, str(saved), out, *PARQUET, "--text-field", "body", "--instruction-field", "query",
                       "--instruction", "represent:")
    assert main(args) == 0
    model = LLM2Vec.from_pretrained(llama_dir)
    expected = model.encode([[q or "represent:", t] for q, t in zip(instructions, texts)], show_progress_bar=False)
    lines, _, embeddings = read_parquet_output(out)
    assert lines == list(range(1, N_LINES + 1))
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5, rtol=0)


def test_readme_one_liners_load_parquet_output_into_datasets_and_faiss(llama_dir, parquet_file, reference, tmp_path,
                                                                      monkeypatch):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "emb"
    assert main(encode_args(llama_dir, parquet_file, out, *PARQUET, "--id-field", "doc_id")) == 0
    monkeypatch.chdir(tmp_path)  # the README's relative paths
    ds = datasets.load_dataset("parquet", data_files="emb/shards/*.parquet", split="train")
    assert ds["id"] == [f"d{i:03d}" for i in range(N_LINES)] and ds["line"] == list(range(1, N_LINES + 1))
    np.testing.assert_array_equal(np.asarray(ds["embedding"], dtype=np.float32), reference[0])
    pytest.importorskip("faiss")
    ds.add_faiss_index(column="embedding")
    _, found = ds.get_nearest_examples("embedding", reference[0][17], k=1)
    assert found["id"] == ["d017"]


def test_table_errors_name_the_problem_and_the_fix(llama_dir, tmp_path, capsys):
    def error(path, *extra):
        assert main(encode_args(llama_dir, str(path), tmp_path / "out", *extra)) == 1
        return capsys.readouterr().err

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["a b", "c d"], "n": [1, 2], "f": [0.5, 1.5]}), table)
    assert "has no column 'text' (columns: 'body', 'n', 'f'); pass --text-field" in error(table)
    assert "column 'n' is int64, expected strings; cast it to string" in error(table, "--text-field", "n")
    assert "column 'f' is double; --id-field needs integer" in error(table, "--text-field", "body", *PARQUET,
                                                                     "--id-field", "f")
    assert "pass --output-format parquet" in error(table, "--text-field", "body", "--id-field", "n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a b"}\n')
    assert "--id-field reads a column of a Parquet or datasets input" in error(jsonl, *PARQUET, "--id-field", "n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither .parquet files nor a datasets state.json" in error(empty)


def test_dataset_dict_directory_names_its_splits(llama_dir, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_dict({"text": ["a b"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    assert main(encode_args(llama_dir, str(tmp_path / "dd"), tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "is a DatasetDict (splits: train, test)" in err and os.path.join("dd", "train") in err


def test_null_and_empty_texts_and_null_ids_are_bad_rows(llama_dir, tmp_path, capsys):
    path = tmp_path / "t.parquet"
    texts = ["one two", None, "three", "  ", "four", "five"]
    pq.write_table(pa.table({"text": texts, "id": [10, 11, 12, 13, None, 15]}), path)
    out = tmp_path / "out"
    args = encode_args(llama_dir, str(path), out, *PARQUET, "--id-field", "id")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: null text; 3 bad line(s) in total" in err
    assert f"{path}:4: whitespace-only text" in err and f"{path}:5: null id" in err
    assert not (out / MANIFEST).exists()
    assert main(args + ["--skip-bad-lines"]) == 0
    lines, ids, _ = read_parquet_output(out)
    assert lines == [1, 3, 6] and ids == [10, 12, 15]
    skipped = json.loads((out / MANIFEST).read_text())["skipped"]
    assert [(s["line"], s["reason"]) for s in skipped] == [(2, "null text"), (4, "whitespace-only text"),
                                                           (5, "null id")]


@pytest.mark.parametrize("kill", ["shard:2:recorded", "shard:3:temp"], ids=["at-boundary", "mid-write"])
def test_parquet_output_resumes_after_sigkill(llama_dir, parquet_file, reference, tmp_path, kill):
    out = tmp_path / "out"
    args = encode_args(llama_dir, parquet_file, out, *PARQUET, "--id-field", "doc_id")
    killed = subprocess.run([sys.executable, "-m", "llm2vec_fast", *args], env=subprocess_env(**{FAULT_ENV: kill}),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert [s["shard"] for s in json.loads((out / "progress" / "rank0.json").read_text())["shards"]] == [0, 1]
    assert main(args) == 0
    assert not any(".tmp-" in name for name in os.listdir(out / "shards"))
    lines, ids, embeddings = read_parquet_output(out)
    assert lines == list(range(1, N_LINES + 1)) and ids == [f"d{i:03d}" for i in range(N_LINES)]
    np.testing.assert_array_equal(embeddings, reference[0])


def test_changed_table_or_output_format_is_refused(llama_dir, texts, tmp_path, capsys):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts[:12]}), path)
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, str(path), out, *PARQUET)) == 0
    assert main(encode_args(llama_dir, str(path), out)) == 1
    assert "output_format: 'parquet' there, None now" in capsys.readouterr().err
    pq.write_table(pa.table({"text": texts[:11] + ["changed"]}), path)
    assert main(encode_args(llama_dir, str(path), out, *PARQUET)) == 1
    assert "input_files" in capsys.readouterr().err
    assert main(encode_args(llama_dir, str(path), out, *PARQUET, "--overwrite")) == 0


def test_load_embeddings_mmap_is_a_lazy_view_over_the_shards(llama_dir, txt_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    view, lines = load_embeddings(str(out), mmap=True)
    full = reference[0]
    assert isinstance(view, StackedRows) and view.shape == full.shape and view.dtype == full.dtype
    assert len(view.parts) == 5 and all(isinstance(p, np.memmap) for p in view.parts)
    np.testing.assert_array_equal(lines, reference[1])
    np.testing.assert_array_equal(np.asarray(view), full)
    for key in (0, -1, 17, slice(8, 33), slice(None, None, 7), slice(40, 10, -3), slice(50, 60),
                [44, 0, 9, 10, 10], np.arange(N_LINES) % 2 == 0, (slice(5, 25), slice(0, 8)), (13, 3)):
        np.testing.assert_array_equal(view[key], full[key])
    assert np.array_equal(np.stack(list(view)), full)
    with pytest.raises(IndexError):
        view[N_LINES]


def test_load_embeddings_refuses_mmap_of_parquet_output(llama_dir, parquet_file, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, parquet_file, out, *PARQUET)) == 0
    with pytest.raises(ValueError, match="cannot be memory-mapped"):
        load_embeddings(str(out), mmap=True)


def test_read_table_shards_holds_one_batch_per_read(texts, tmp_path, monkeypatch):
    """Bounded memory: the reader asks pyarrow for BATCH_ROWS rows at a time and only the wanted columns."""
    from llm2vec_fast.encode_job import tables

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": texts, "blob": ["x" * 1000] * N_LINES}), path)
    monkeypatch.setattr(tables, "BATCH_ROWS", 4)
    seen = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            seen.append((batch.num_rows, batch.schema.names))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    columns = tables.check_columns(str(path), "parquet", "text", "instruction", None)
    shards = list(tables.read_table_shards(columns, "parquet", SHARD, lambda k: k != 1))
    assert [s.index for s in shards] == [0, 2, 3, 4] and shards[-1].last_line == N_LINES
    assert [t for s in shards for t in s.texts] == texts[:10] + texts[20:]
    assert max(n for n, _ in seen) == 4 and {tuple(names) for _, names in seen} == {("text",)}


def test_the_map_batches_class_also_maps_a_datasets_dataset(llama_dir, texts):
    """The Python API for a `datasets` Dataset in memory: Dataset.map with the Ray Data class (no Ray needed)."""
    datasets = pytest.importorskip("datasets")
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.integrations.ray import LLM2VecPredictor

    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(N_LINES))})
    encoder = LLM2VecPredictor(llama_dir, drop_columns=["text"])
    out = ds.with_format("arrow").map(encoder, batched=True, batch_size=16, remove_columns=["text"])
    assert out.column_names == ["id", "embedding"] and out["id"].to_pylist() == list(range(N_LINES))
    expected = LLM2Vec.from_pretrained(llama_dir).encode(texts, show_progress_bar=False).numpy()
    np.testing.assert_allclose(np.asarray(out.with_format("numpy")["embedding"]), expected, atol=1e-5, rtol=0)
