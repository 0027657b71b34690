"""Ray Data (llm2vec_fast/integrations/ray.py, llm2vec_fast/encode_job/ray_engine.py) on a local 2-CPU Ray instance
with the tiny random Llama: the map_batches class against LLM2Vec.encode, `encode --engine ray` against the local
engine (same shards, same manifest), ids kept in order, a killed actor retried with nothing lost or duplicated, and
a resume of a local run's output. Runs where Ray is installed (the ray extra)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from llm2vec_fast.cli import main  # noqa: E402
from llm2vec_fast.encode_job.layout import MANIFEST  # noqa: E402
from llm2vec_fast.faults import VARIABLE as FAULT_ENV  # noqa: E402
from llm2vec_fast.integrations.ray import LLM2VecPredictor  # noqa: E402
from encode_helpers import (N_LINES, assert_same_output, encode_args, private_hash_cache,  # noqa: E402,F401
                            reference, subprocess_env, texts, txt_file)

PARQUET = ("--output-format", "parquet")
RAY = ("--engine", "ray", "--ray-actors", "2")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One Ray instance for the module; actors inherit the fault "ray-actor@FILE", armed by creating FILE."""
    kill_file = str(tmp_path_factory.mktemp("kill") / "armed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, f"ray-actor@{kill_file}")
        patch.setenv("OMP_NUM_THREADS", "1")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield kill_file
        ray.shutdown()


@pytest.fixture(scope="module")
def table_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("tables") / "corpus.parquet"
    pq.write_table(pa.table({"doc_id": [f"d{i:03d}" for i in range(N_LINES)], "text": texts}), path,
                   row_group_size=7)
    return str(path)


@pytest.fixture(scope="module")
def local_parquet(llama_dir, table_file, tmp_path_factory):
    """The local engine's Parquet output of table_file, with ids."""
    out = tmp_path_factory.mktemp("local") / "out"
    assert main(encode_args(llama_dir, table_file, out, *PARQUET, "--id-field", "doc_id")) == 0
    return out


def read_output(out):
    table = pa.concat_tables([pq.read_table(f) for f in sorted((out / "shards").glob("*.parquet"))])
    return table.column("line").to_pylist(), table.column("id").to_pylist(), \
        np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_predictor_in_map_batches_equals_llm2vec_encode(local_ray, llama_dir, texts):
    from llm2vec_fast import LLM2Vec

    rows = pa.table({"id": list(range(N_LINES)), "text": texts,
                     "instruction": [None if i % 2 else "topic:" for i in range(N_LINES)]})
    blocks = [rows.slice(start, 12) for start in range(0, N_LINES, 12)]  # several blocks, no task to cut them
    ds = ray.data.from_arrow(blocks).map_batches(
        LLM2VecPredictor, fn_constructor_kwargs={"model": llama_dir, "drop_columns": ["text"]},
        batch_format="pyarrow", batch_size=8, concurrency=2, num_cpus=1)
    result = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    assert result.column_names == ["id", "instruction", "embedding"]
    assert result.column("id").to_pylist() == list(range(N_LINES))
    expected = LLM2Vec.from_pretrained(llama_dir).encode(
        [["topic:" if i % 2 == 0 else "", t] for i, t in enumerate(texts)], show_progress_bar=False).numpy()
    np.testing.assert_allclose(np.stack(result.column("embedding").to_numpy(zero_copy_only=False)), expected,
                               atol=1e-5, rtol=0)


def test_predictor_names_a_null_text(local_ray, llama_dir):
    predictor = LLM2VecPredictor(llama_dir)
    with pytest.raises(ValueError, match=r"row 1 \(from 0\) of the batch: null text"):
        predictor(pa.table({"text": ["a b", None]}))


def test_engine_ray_equals_the_local_engine(local_ray, llama_dir, table_file, local_parquet, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, table_file, out, *PARQUET, *RAY, "--id-field", "doc_id")) == 0
    lines, ids, embeddings = read_output(out)
    assert lines == list(range(1, N_LINES + 1)) and ids == [f"d{i:03d}" for i in range(N_LINES)]
    np.testing.assert_array_equal(embeddings, reference[0])  # bitwise: each shard encoded as the local engine does
    assert json.loads((out / MANIFEST).read_text()) == json.loads((local_parquet / MANIFEST).read_text())
    assert_same_output(out, reference)


def test_engine_ray_skips_bad_rows_like_the_local_engine(local_ray, llama_dir, texts, tmp_path):
    path = tmp_path / "t.parquet"
    rows = [None if i in (3, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19) else t for i, t in enumerate(texts)]
    pq.write_table(pa.table({"text": rows}), path)  # shard 1 (rows 11-20) has one valid row, 20
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(encode_args(llama_dir, str(path), local, "--skip-bad-lines")) == 0
    assert main(encode_args(llama_dir, str(path), remote, "--skip-bad-lines", *RAY)) == 0
    assert json.loads((remote / MANIFEST).read_text()) == json.loads((local / MANIFEST).read_text())
    assert_same_output(remote, _load(local))
    assert main(encode_args(llama_dir, str(path), tmp_path / "refused", *RAY)) == 1  # without --skip-bad-lines


def _load(out):
    from llm2vec_fast.encode_job import load_embeddings

    return load_embeddings(str(out))


def test_a_killed_actor_is_retried_with_nothing_lost_or_duplicated(local_ray, llama_dir, table_file, reference,
                                                                    tmp_path):
    open(local_ray, "w").close()  # arms the kill: the first actor call takes it and SIGKILLs its process
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, table_file, out, *PARQUET, *RAY, "--id-field", "doc_id")) == 0
    assert not os.path.exists(local_ray)  # an actor did die
    lines, ids, embeddings = read_output(out)
    assert lines == list(range(1, N_LINES + 1)) and ids == [f"d{i:03d}" for i in range(N_LINES)]
    np.testing.assert_array_equal(embeddings, reference[0])
    progress = json.loads((out / "progress" / "rank0.json").read_text())
    assert [s["shard"] for s in progress["shards"]] == [0, 1, 2, 3, 4]


def test_engine_ray_resumes_a_killed_local_run(local_ray, llama_dir, table_file, reference, tmp_path):
    out = tmp_path / "out"
    args = encode_args(llama_dir, table_file, out, *PARQUET)
    killed = subprocess.run([sys.executable, "-m", "llm2vec_fast", *args], env=subprocess_env(**{FAULT_ENV: "shard:2:recorded"}),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert main([*args, *RAY]) == 0
    assert_same_output(out, reference)


def test_engine_ray_int8_equals_the_local_engine(local_ray, llama_dir, table_file, tmp_path):
    # The ranges are calibrated by a Ray task, the codes quantized in the actors: the same bytes as the local engine.
    options = (*PARQUET, "--precision", "int8", "--calibration-rows", "20", "--truncate-dim", "48", "--normalize")
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert main(encode_args(llama_dir, table_file, local, *options)) == 0
    assert main(encode_args(llama_dir, table_file, remote, *options, *RAY)) == 0
    assert json.loads((remote / MANIFEST).read_text()) == json.loads((local / MANIFEST).read_text())
    ours, theirs = _load(remote), _load(local)
    assert ours.embeddings.dtype == np.int8 and ours.embeddings.shape == (N_LINES, 48)
    np.testing.assert_array_equal(ours.ranges, theirs.ranges)
    np.testing.assert_array_equal(ours.embeddings, theirs.embeddings)


def test_engine_ray_refuses_line_corpora(llama_dir, txt_file, tmp_path, capsys):
    assert main(encode_args(llama_dir, txt_file, tmp_path / "out", *RAY)) == 1
    assert "--engine ray reads Parquet or datasets inputs" in capsys.readouterr().err
