"""The output directory of `llm2vec-fast encode` (llm2vec_fast/encode_job/shards.py, reader.py): it writes only into
directories it wrote, deletes only its own files, trusts nothing a tampered manifest or a planted link points at,
and leaves no temporary file behind. Every case runs the CLI in process on a tiny random Llama."""

import json
import os
import shutil

import numpy as np
import pytest

from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.encode_job.layout import MANIFEST
from encode_helpers import (assert_same_output, encode_args, error_of, private_hash_cache, reference,  # noqa: F401
                            temp_files, texts, txt_file)


# ------------------------------------------------------------------------------- 1. only our own directories

def plant_look_alike(out):
    """What an encode output looks like, without our fingerprint: someone else's files."""
    (out / "shards").mkdir(parents=True)
    (out / "progress").mkdir()
    for name in ("manifest.json", "shards/shard-000000.npy", "progress/rank0.json"):
        (out / name).write_text("precious")


@pytest.mark.parametrize("fingerprint_file", [None, '{"version": 2}', "not json"],
                         ids=["no-fingerprint", "look-alike-fingerprint", "broken-fingerprint"])
def test_overwrite_leaves_a_directory_we_did_not_write_alone(llama_dir, txt_file, tmp_path, capsys,
                                                             fingerprint_file):
    out = tmp_path / "out"
    plant_look_alike(out)
    if fingerprint_file is not None:
        (out / "fingerprint.json").write_text(fingerprint_file)
    before = sorted(os.listdir(out))
    err = error_of(encode_args(llama_dir, txt_file, out, "--overwrite"), capsys)
    assert "not written by llm2vec-fast encode" in err and "also with --overwrite" in err
    assert sorted(os.listdir(out)) == before
    for name in ("manifest.json", "shards/shard-000000.npy", "progress/rank0.json"):
        assert (out / name).read_text() == "precious"


def test_overwrite_deletes_only_what_we_wrote(llama_dir, txt_file, texts, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    (out / "notes.txt").write_text("mine")
    (out / "shards" / "keep.txt").write_text("mine too")
    fingerprint_data = json.loads((out / "fingerprint.json").read_text())
    assert fingerprint_data["written_by"] == "llm2vec-fast encode"
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("\n".join(texts[:20]) + "\n")
    assert main(encode_args(llama_dir, shorter, out, "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "shards" / "keep.txt").read_text() == "mine too"
    assert sorted(os.listdir(out / "shards")) == ["keep.txt", "shard-000000.lines.npy", "shard-000000.npy",
                                                  "shard-000001.lines.npy", "shard-000001.npy"]
    np.testing.assert_array_equal(load_embeddings(str(out))[0], reference[0][:20])


# ----------------------------------------------------------------------------- 5. output files can be trusted

@pytest.fixture
def finished(llama_dir, txt_file, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    return out


def edit_manifest(out, edit):
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_load_refuses_paths_outside_the_output(finished, tmp_path):
    outside = tmp_path / "outside.npy"
    shutil.copy(finished / "shards" / "shard-000000.npy", outside)
    for path in (str(outside), "../outside.npy", "shards/../../outside.npy"):
        edit_manifest(finished, lambda m: m["shards"][0].update(file=path))
        with pytest.raises(ValueError, match="outside the output directory"):
            load_embeddings(str(finished))
    edit_manifest(finished, lambda m: m["shards"][0].update(file="shards/shard-000000.npy"))
    load_embeddings(str(finished))
    os.remove(finished / "shards" / "shard-000000.npy")
    os.symlink(outside, finished / "shards" / "shard-000000.npy")
    with pytest.raises(ValueError, match="'shards/shard-000000.npy', which is outside"):
        load_embeddings(str(finished))


def test_load_checks_each_shard_against_the_index(finished):
    lines_file = finished / "shards" / "shard-000001.lines.npy"
    lines = np.load(lines_file)
    np.save(lines_file, lines[::-1].copy())
    # verify=False: the structural cross-checks alone (the content hashes would refuse the edit first).
    with pytest.raises(ValueError, match=r"shards/shard-000001.lines.npy does not match rows 10..19 of "
                                         r"line_numbers.npy.*--overwrite"):
        load_embeddings(str(finished), verify=False)
    np.save(lines_file, lines)
    edit_manifest(finished, lambda m: m["shards"][1].update(rows=9))
    with pytest.raises(ValueError, match="shard-000001.npy holds 10 rows.*says 9 rows"):
        load_embeddings(str(finished), verify=False)


def _swap_files(a, b):
    a.rename(a.with_suffix(".tmp"))
    b.rename(a)
    a.with_suffix(".tmp").rename(b)


@pytest.mark.parametrize("damage", ["swapped-on-disk", "swapped-in-manifest", "another-runs-shard", "zeroed-bytes",
                                    "nan"])
def test_load_verifies_each_shards_content(finished, damage, tmp_path, llama_dir, txt_file):
    shards = finished / "shards"
    expected_name = "shard-000000"
    if damage == "swapped-on-disk":
        _swap_files(shards / "shard-000000.npy", shards / "shard-000001.npy")
        _swap_files(shards / "shard-000000.lines.npy", shards / "shard-000001.lines.npy")
    elif damage == "swapped-in-manifest":
        edit_manifest(finished, lambda m: m["shards"].__setitem__(slice(0, 2), m["shards"][1::-1]))
        expected_name = "shard-000001"
    elif damage == "another-runs-shard":
        other = tmp_path / "other"
        assert main(encode_args(llama_dir, txt_file, other, "--pooling", "last_token")) == 0
        shutil.copy(other / "shards" / "shard-000000.npy", shards / "shard-000000.npy")
    elif damage == "zeroed-bytes":
        data = bytearray((shards / "shard-000000.npy").read_bytes())
        data[-200:] = bytes(200)
        (shards / "shard-000000.npy").write_bytes(bytes(data))
    else:
        array = np.load(shards / "shard-000000.npy")
        array[3, 5] = np.nan
        np.save(shards / "shard-000000.npy", array)
    with pytest.raises(ValueError, match=rf"cannot be trusted: .*{expected_name}"):
        load_embeddings(str(finished))
    with pytest.raises(ValueError, match=rf"cannot be trusted: .*{expected_name}"):
        load_embeddings(str(finished), mmap=True)


def test_nan_is_refused_even_where_the_hash_was_recomputed(finished):
    """A NaN is refused on its own, not only through the hash (an edit that also rewrote the manifest)."""
    from llm2vec_fast.files import sha256_file

    path = finished / "shards" / "shard-000000.npy"
    array = np.load(path)
    array[3, 5] = np.nan
    np.save(path, array)
    edit_manifest(finished, lambda m: m["shards"][0]["sha256"].update({"shards/shard-000000.npy": sha256_file(path)}))
    with pytest.raises(ValueError, match=r"shards/shard-000000.npy holds non-finite embeddings \(NaN or inf\) in 1 "
                                         r"row\(s\), the first for input line 4"):
        load_embeddings(str(finished))


def test_an_output_without_hashes_needs_verify_false(finished):
    edit_manifest(finished, lambda m: [shard.pop("sha256") for shard in m["shards"]])
    with pytest.raises(ValueError, match=r"records no sha256 for 'line_numbers.npy'|records no sha256 for 'shards/"):
        load_embeddings(str(finished))
    embeddings, lines = load_embeddings(str(finished), verify=False)
    assert len(embeddings) == len(lines) > 0


def test_a_planted_manifest_link_is_neither_complete_nor_loadable(finished, tmp_path, llama_dir, txt_file, capsys):
    real = tmp_path / "real-manifest.json"
    (finished / MANIFEST).rename(real)
    os.symlink(real, finished / MANIFEST)
    with pytest.raises(ValueError, match="manifest.json is a symbolic link"):
        load_embeddings(str(finished))
    err = error_of(encode_args(llama_dir, txt_file, finished), capsys)
    assert "manifest.json is a symbolic link" in err


def test_files_get_the_umask_mode_and_no_temp_files_survive(llama_dir, txt_file, tmp_path):
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        (out / "shards").mkdir(parents=True)
        (out / "progress").mkdir()
        (out / "fingerprint.json").write_text('{"written_by": "llm2vec-fast encode"}')
        for leftover in (".manifest.json.tmp-1", "shards/.shard-000000.npy.tmp-1-ab12",
                         "progress/.rank0.json.tmp-9", ".write-probe-7-0"):
            (out / leftover).write_text("from a killed run")
        assert main(encode_args(llama_dir, txt_file, out, "--overwrite")) == 0
    finally:
        os.umask(old)
    assert temp_files(out) == []
    for directory, subdirs, names in os.walk(out):
        for name in names:
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o640, name
        for name in subdirs:
            assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == 0o750, name


@pytest.mark.parametrize("linked", ["shards", "progress"])
def test_a_planted_directory_link_is_refused(llama_dir, txt_file, tmp_path, capsys, linked):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(elsewhere, out / linked)
    err = error_of(encode_args(llama_dir, txt_file, out), capsys)
    assert f"{out / linked} is a symbolic link" in err
    assert os.listdir(elsewhere) == []


def test_a_link_planted_at_a_shard_name_is_replaced_not_followed(llama_dir, txt_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.remove(out / MANIFEST)
    os.remove(out / "shards" / "shard-000004.npy")
    os.symlink(victim, out / "shards" / "shard-000004.npy")
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    assert victim.read_text() == "keep me" and not os.path.islink(out / "shards" / "shard-000004.npy")
    assert_same_output(out, reference)
