"""`llm2vec-fast encode --precision / --truncate-dim / --calibration-rows / --ranges` (encode_job/storage.py) on the
tiny random Llama: what the shards hold in each precision and format, the ranges fixed before the first shard and
recorded, a SIGKILLed run resumed bitwise, a resume with other storage options refused, and FAISS' binary index
searching the binary output."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm2vec_fast import quantization as q
from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.encode_job.layout import MANIFEST, RANGES
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from encode_helpers import (N_LINES, encode_args, error_of, private_hash_cache, reference,  # noqa: F401
                            subprocess_env, texts, txt_file)

pq = pytest.importorskip("pyarrow.parquet")

DIM = 64  # the tiny Llama's hidden size
CALIBRATION = ("--calibration-rows", "25")


@pytest.fixture(scope="module", autouse=True)
def pytorch_ops():
    """The PyTorch path of every op (also in the subprocesses): storage does not depend on the C++ ops, whose
    one-time build in this module's private cache would cost more than all its tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM2VEC_FAST_NATIVE", "0")
        yield


def float_rows(reference, truncate_dim=None, normalize=False):
    """The float32 reference run's embeddings as the storage options make them before quantizing."""
    return q.finish(torch.from_numpy(reference[0]), truncate_dim=truncate_dim, normalize=normalize).numpy()


class Killed(BaseException):
    """Stands for a SIGKILL at a fault point in process: nothing after the point runs, no handler catches it."""


def kill_in_process(monkeypatch, spec):
    from llm2vec_fast import faults

    fault = faults.parse(spec)

    def point(name, count=None, stage=None):
        if fault.matches(name, count, stage):
            raise Killed(spec)

    monkeypatch.setattr(faults, "point", point)


# Each precision once, alternating the formats: every stored dtype is written and read in both over the cases. The
# int8 case is killed for real (a subprocess and SIGKILL, as tests/test_faults.py does); the others, to keep the
# module fast, by raising at the same fault point in process, which leaves the same files behind.
CASES = [("float16", "parquet", None, False), ("int8", "npy", 24, True), ("uint8", "parquet", None, False),
         ("binary", "npy", None, False), ("ubinary", "parquet", 20, False)]


@pytest.mark.parametrize("precision, fmt, truncate_dim, sigkill", CASES, ids=[c[0] for c in CASES])
def test_resume_after_a_kill_equals_an_uninterrupted_run(llama_dir, txt_file, reference, tmp_path, monkeypatch,
                                                         precision, fmt, truncate_dim, sigkill):
    options = ["--precision", precision, "--output-format", fmt, *CALIBRATION, "--normalize"]
    if truncate_dim is not None:
        options += ["--truncate-dim", str(truncate_dim)]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, whole, *options)) == 0
    args = encode_args(llama_dir, txt_file, out, *options)
    if sigkill:
        killed = subprocess.run([sys.executable, "-m", "llm2vec_fast", *args],
                                env=subprocess_env(**{FAULT_ENV: "shard:3:unrecorded"}), capture_output=True,
                                text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
    else:
        with monkeypatch.context() as patch:
            kill_in_process(patch, "shard:3:unrecorded")
            with pytest.raises(Killed):
                main(args)
    assert not (out / MANIFEST).exists() and (out / RANGES).exists() == (precision in q.SCALAR)
    assert main(args) == 0
    loaded, expected = load_embeddings(str(out)), load_embeddings(str(whole))
    np.testing.assert_array_equal(loaded.embeddings, expected.embeddings)  # bitwise, dtype included
    np.testing.assert_array_equal(loaded.line_numbers, reference[1])

    embedding_dim = truncate_dim or DIM
    assert (loaded.precision, loaded.embedding_dim, loaded.truncate_dim) == (precision, embedding_dim, truncate_dim)
    assert loaded.embeddings.dtype == q.stored_dtype(precision)
    assert loaded.embeddings.shape == (N_LINES, q.stored_width(embedding_dim, precision))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["dim"] == q.stored_width(embedding_dim, precision)
    assert manifest["dtype"] == q.stored_dtype(precision).name
    if fmt == "parquet":  # a fixed-size list of the matching Arrow type
        field = pq.read_schema(out / "shards" / "shard-000000.parquet").field("embedding").type
        assert np.dtype(field.value_type.to_pandas_dtype()) == q.stored_dtype(precision)
        assert field.list_size == manifest["dim"]
    else:
        assert np.load(out / "shards" / "shard-000000.npy").dtype == q.stored_dtype(precision)

    # What was stored is sentence-transformers' quantization of the float run, truncated then normalized, with the
    # ranges of the first --calibration-rows rows.
    floats = float_rows(reference, truncate_dim, normalize=True)
    if precision in q.SCALAR:
        np.testing.assert_array_equal(loaded.ranges, np.load(out / RANGES))
        np.testing.assert_allclose(loaded.ranges, q.calibration_ranges(floats[:25]), atol=1e-6, rtol=0)
        assert manifest["ranges_file"] == RANGES
        floats_codes = q.quantize(floats, precision, loaded.ranges)
        assert np.abs(loaded.embeddings.astype(int) - floats_codes.astype(int)).max() <= 1  # float rounding
    else:
        assert loaded.ranges is None
        if precision in q.BINARY:
            mismatched = np.unpackbits(loaded.embeddings.view(np.uint8) ^ q.quantize(floats, precision)
                                       .view(np.uint8), axis=1)
            assert mismatched.sum() <= 2  # only a value within float rounding of 0 could flip
        else:
            np.testing.assert_allclose(loaded.embeddings.astype(np.float32), floats, atol=2e-3, rtol=0)


def test_resume_with_other_storage_options_is_refused(llama_dir, txt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out, "--precision", "int8", *CALIBRATION)) == 0
    for other, named in [(("--precision", "uint8"), "precision: 'int8' there, 'uint8' now"),
                         (("--precision", "int8", "--calibration-rows", "30"), "calibration_rows: 25 there, 30 now"),
                         (("--precision", "int8", *CALIBRATION, "--truncate-dim", "32"), "truncate_dim: None there"),
                         (("--precision", "float16",), "shard_dtype: 'int8' there, 'float16' now")]:
        err = error_of(encode_args(llama_dir, txt_file, out, *other), capsys)
        assert "holds embeddings made with other arguments" in err and named in err, err
    ranges = tmp_path / "ranges.npy"
    np.save(ranges, np.load(out / RANGES))
    err = error_of(encode_args(llama_dir, txt_file, out, "--precision", "int8", "--ranges", str(ranges)), capsys)
    assert "ranges_sha256" in err and "calibration_rows" in err


def test_ranges_file_is_used_and_its_content_fingerprinted(llama_dir, txt_file, reference, tmp_path, capsys):
    ranges_file, out = tmp_path / "ranges.npy", tmp_path / "out"
    ranges = q.calibration_ranges(reference[0][:5])  # narrow on purpose: many values clip
    np.save(ranges_file, ranges)
    args = encode_args(llama_dir, txt_file, out, "--precision", "uint8", "--ranges", str(ranges_file))
    assert main(args) == 0
    loaded = load_embeddings(str(out))
    np.testing.assert_array_equal(loaded.ranges, ranges)
    codes = q.quantize(reference[0], "uint8", ranges)
    assert np.abs(loaded.embeddings.astype(int) - codes.astype(int)).max() <= 1
    np.save(ranges_file, ranges * 2)
    err = error_of(args, capsys)
    assert "ranges_sha256: the content changed" in err


@pytest.mark.parametrize("options, message", [
    (("--shard-dtype", "float16", "--precision", "int8"),
     "--shard-dtype float16 and --precision int8 contradict each other"),
    (("--precision", "binary", "--ranges", "r.npy"), "--ranges sets the buckets of --precision int8 or uint8"),
    (("--precision", "int8", "--ranges", "missing.npy"), "--ranges 'missing.npy': no such file"),
    (("--truncate-dim", "65",), "--truncate-dim must be an integer from 1 to the model's embedding dimension 64"),
    (("--precision", "int8", "--calibration-rows", "1"), "cannot calibrate --precision int8 on the first 1 input rows"),
], ids=["contradiction", "ranges-for-binary", "missing-ranges", "truncate-too-wide", "one-calibration-row"])
def test_bad_storage_options_are_named(llama_dir, txt_file, tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.npy").write_bytes(b"")
    err = error_of(encode_args(llama_dir, txt_file, tmp_path / "out", *options), capsys)
    assert message in err, err


def test_faiss_binary_index_searches_the_binary_output(llama_dir, txt_file, tmp_path):
    faiss = pytest.importorskip("faiss")
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out, "--precision", "binary")) == 0
    loaded = load_embeddings(str(out))
    codes = (loaded.embeddings.astype(np.int16) + 128).astype(np.uint8)  # undo binary's -128: the packed bytes
    index = faiss.IndexBinaryFlat(loaded.embedding_dim)
    index.add(codes)
    distances, ids = index.search(codes[:5], 3)
    assert (distances[:, 0] == 0).all()  # each row is its own nearest neighbour at Hamming distance 0
    for row in range(5):  # FAISS' Hamming distances are those of the bits
        bits = np.unpackbits(codes ^ codes[row], axis=1).sum(axis=1)
        assert sorted(bits)[:3] == sorted(distances[row].tolist())
