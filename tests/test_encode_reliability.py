"""`llm2vec-fast encode` as a careless or hostile user meets it: directories it did not write, models and inputs
changed between runs, a model that gives NaN, CR line endings, a 30 MB line, a full disk, and kills at random
moments (the output directory's own defences, against foreign directories, tampering and planted links, are in
test_shards.py). Every case runs the CLI in process on a tiny random Llama (kills: in a
subprocess) and compares with an uninterrupted run."""

import errno
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from llm2vec_fast import files
from llm2vec_fast.encode_job import fingerprint
from llm2vec_fast.cli import main
from llm2vec_fast.encode_job.corpus import InputSpec, input_identity
from llm2vec_fast.lines import OverlongLine, numbered_lines
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.encode_job.layout import MANIFEST
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from encode_helpers import (SHARD, assert_same_output, encode_args, error_of, private_hash_cache,  # noqa: F401
                            reference, temp_files, texts, txt_file)
from tiny_models import build_model_dir



@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A tiny Llama whose weight file is over 1 MiB (the old fingerprint hashed only the first MiB)."""
    return build_model_dir(str(tmp_path_factory.mktemp("wide") / "model"), "llama", intermediate_size=1024)


def edit_tensor(model_dir, name, edit) -> None:
    path = os.path.join(model_dir, "model.safetensors")
    state = load_file(path)
    edit(state[name])
    save_file(state, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------- 2. resume never mixes two configurations

def set_pooling(model_dir, mode):
    with open(os.path.join(model_dir, "llm2vec_config.json"), "w") as f:
        json.dump({"pooling_mode": mode}, f)


def change_tokenizer(model_dir):
    path = os.path.join(model_dir, "tokenizer.json")
    with open(path) as f:
        tokenizer = json.load(f)
    tokenizer["normalizer"] = {"type": "Lowercase"}
    with open(path, "w") as f:
        json.dump(tokenizer, f)


def change_weights_keeping_size(model_dir):
    path = os.path.join(model_dir, "model.safetensors")
    size = os.path.getsize(path)
    edit_tensor(model_dir, "norm.weight", lambda t: t.mul_(2))  # stored last: past the first MiB
    assert os.path.getsize(path) == size > 1 << 20


@pytest.mark.parametrize("change, changed_file", [
    (lambda d: set_pooling(d, "weighted_mean"), "llm2vec_config.json"),
    (change_tokenizer, "tokenizer.json"),
    (change_weights_keeping_size, "model.safetensors"),
], ids=["pooling-in-llm2vec-config", "tokenizer", "weights-same-size"])
def test_changed_model_is_refused_finished_or_not(wide_model_dir, txt_file, tmp_path, capsys, change,
                                                  changed_file):
    model_dir = tmp_path / "model"
    shutil.copytree(wide_model_dir, model_dir)
    set_pooling(model_dir, "mean")
    out = tmp_path / "out"
    args = encode_args(model_dir, txt_file, out)
    assert main(args) == 0
    change(str(model_dir))
    err = error_of(args, capsys)  # a finished output: not "already complete; nothing to do"
    assert f"model_files: {changed_file} changed" in err and "--overwrite" in err
    os.remove(out / MANIFEST)  # an interrupted output: not a silent resume
    assert f"model_files: {changed_file} changed" in error_of(args, capsys)


@pytest.mark.parametrize("edit", ["changed-line", "more-lines", "fewer-lines"])
def test_changed_stdin_of_a_finished_output_is_refused(llama_dir, texts, tmp_path, monkeypatch, capsys, edit):
    def feed(lines):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode())))

    out = tmp_path / "out"
    feed(texts)
    assert main(encode_args(llama_dir, "-", out)) == 0
    feed(texts)
    capsys.readouterr()
    assert main(encode_args(llama_dir, "-", out)) == 0
    assert "already complete" in capsys.readouterr().err
    edited = {"changed-line": texts[:30] + ["a different line"] + texts[31:], "more-lines": texts + ["one more"],
              "fewer-lines": texts[:20]}[edit]
    feed(edited)
    err = error_of(encode_args(llama_dir, "-", out), capsys)
    span = {"changed-line": "31-40", "more-lines": "41-46", "fewer-lines": "21-45"}[edit]  # the changed lines
    assert f"<stdin> lines {span} changed since the output was written" in err


def test_input_identity_covers_the_whole_file(tmp_path):
    path = tmp_path / "big.txt"
    data = bytearray(b"the cat sat on the mat\n" * 100_000)  # 2.3 MB
    path.write_bytes(data)
    spec = InputSpec(str(path), "txt")
    before = input_identity(spec)
    data[-5] = ord("x")
    path.write_bytes(data)
    after = input_identity(spec)
    assert after["input_size"] == before["input_size"] and after["input_sha256"] != before["input_sha256"]


def test_hash_cache_is_used_and_notices_a_rewrite_with_restored_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "RACY_SECONDS", -1.0)  # cache even a file written a moment ago
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = fingerprint.file_sha256(str(path))
    stat = os.stat(path)
    with monkeypatch.context() as patch:
        patch.setattr(fingerprint, "sha256_file", lambda _: pytest.fail("the cached hash was not used"))
        assert fingerprint.file_sha256(str(path)) == first
    time.sleep(0.01)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime; ctime still moves
    assert fingerprint.file_sha256(str(path)) != first


# ------------------------------------------------------------------------------------- 3. no non-finite rows

def poisoned_copy(source, target, texts) -> list[int]:
    """A copy of the model whose embedding row of one token is NaN; the input lines holding that token, all
    after the first shard."""
    shutil.copytree(source, target)
    tokenizer = AutoTokenizer.from_pretrained(source)
    holders: dict[int, list[int]] = {}
    for number, text in enumerate(texts, start=1):
        for token in set(tokenizer(text, add_special_tokens=False)["input_ids"]):
            holders.setdefault(token, []).append(number)
    token, lines = next((t, n) for t, n in sorted(holders.items()) if n[0] > SHARD and len(n) >= 2)
    edit_tensor(target, "embed_tokens.weight", lambda w: w[token].fill_(float("nan")))
    return lines


def test_nan_embeddings_are_refused_naming_the_lines(llama_dir, txt_file, texts, tmp_path, capsys):
    poisoned = poisoned_copy(llama_dir, tmp_path / "model", texts)
    shard = (poisoned[0] - 1) // SHARD
    in_shard = [n for n in poisoned if (n - 1) // SHARD == shard]
    out = tmp_path / "out"
    err = error_of(encode_args(tmp_path / "model", txt_file, out), capsys)
    assert f"non-finite embeddings (NaN or inf) for {len(in_shard)} line(s)" in err
    assert f"(lines {', '.join(map(str, in_shard))})" in err and f"nothing of shard {shard}" in err
    written = sorted(os.listdir(out / "shards"))
    assert written == [f"shard-{k:06d}{ext}" for k in range(shard) for ext in (".lines.npy", ".npy")]
    assert not (out / MANIFEST).exists()


def test_overflow_of_float16_shards_is_refused(llama_dir, txt_file, tmp_path, capsys):
    shutil.copytree(llama_dir, tmp_path / "model")
    edit_tensor(tmp_path / "model", "norm.weight", lambda w: w.fill_(1e6))  # finite in float32, inf in float16
    err = error_of(encode_args(tmp_path / "model", txt_file, tmp_path / "out", "--shard-dtype", "float16"), capsys)
    assert "--shard-dtype float16 gave non-finite embeddings" in err and "for 10 line(s)" in err
    assert "use --shard-dtype float32" in err and "nothing of shard 0" in err


# ------------------------------------------------------------------------------------------ 4. line endings

@pytest.mark.parametrize("joiner", ["\r", "\r\n", "mixed"])
def test_cr_and_crlf_line_endings_equal_lf(llama_dir, texts, reference, tmp_path, joiner):
    rng = random.Random(3)
    breaks = [rng.choice(["\r", "\n", "\r\n"]) if joiner == "mixed" else joiner for _ in texts]
    path = tmp_path / "corpus.txt"
    path.write_bytes("".join(t + b for t, b in zip(texts, breaks)).encode())
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, path, out)) == 0
    assert_same_output(out, reference)


def test_twenty_cr_separated_texts_are_twenty_lines(llama_dir, texts, tmp_path):
    path = tmp_path / "mac.txt"
    path.write_bytes("\r".join(texts[:20]).encode())
    assert main(encode_args(llama_dir, path, tmp_path / "out")) == 0
    embeddings, lines = load_embeddings(str(tmp_path / "out"))
    assert embeddings.shape[0] == 20 and lines.tolist() == list(range(1, 21))


# ------------------------------------------------------------------------------------------- 6. a 30 MB line

@pytest.fixture(scope="module")
def huge_line_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("huge") / "huge.txt"
    with open(path, "wb") as f:
        f.write("\n".join(texts[:3]).encode() + b"\n")
        f.write(b"x" * (30 << 20) + b"\n")
        f.write("\n".join(texts[3:5]).encode() + b"\n")
    return path


def test_a_30_mb_line_is_a_bad_line(llama_dir, huge_line_file, texts, tmp_path, capsys):
    out = tmp_path / "out"
    err = error_of(encode_args(llama_dir, huge_line_file, out), capsys)
    assert f"{huge_line_file}:4: line of {30 << 20} bytes, longer than the limit of 1048576 bytes" in err
    assert "--max-line-bytes" in err and "--skip-bad-lines" in err
    assert main(encode_args(llama_dir, huge_line_file, out, "--skip-bad-lines")) == 0
    embeddings, lines = load_embeddings(str(out))
    assert lines.tolist() == [1, 2, 3, 5, 6]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["skipped"][0]["line"] == 4 and "longer than the limit" in manifest["skipped"][0]["reason"]


class EndlessLine:
    """A stream of one 30 MB line and a short one, produced as read (never in memory at once)."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int) -> bytes:
        if self.left > 0:
            chunk = min(n, self.left)
            self.left -= chunk
            return b"y" * chunk
        if self.left == 0:
            self.left = -1
            return b"\nshort\n"
        return b""


def test_line_reader_memory_is_bounded():
    tracemalloc.start()
    try:
        lines = list(numbered_lines(EndlessLine(30 << 20), max_line_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [(1, OverlongLine(30 << 20, 1 << 20)), (2, b"short")]
    assert peak < 4 << 20


# ------------------------------------------------------------------------------------------ 6. a full disk

def test_disk_full_is_one_line_and_resume_equals_an_uninterrupted_run(llama_dir, txt_file, reference, tmp_path,
                                                                      monkeypatch, capsys):
    real_write = files._write_fully
    out = tmp_path / "out"

    def fill_up(fd, data):
        # The disk fills up while shard 1's embeddings are written (the temporary file is named after it).
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".shard-000001.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data)

    with monkeypatch.context() as patch:
        patch.setattr(files, "_write_fully", fill_up)
        err = error_of(encode_args(llama_dir, txt_file, out), capsys)
    assert err.count("\n") == 1
    assert f"cannot write {out / 'shards' / 'shard-000001.npy'} (No space left on device); free some space" in err
    assert temp_files(out) == []
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    assert_same_output(out, reference)


# ------------------------------------------------------------------------------- 7. kills at random moments

def written_files(out) -> set[str]:
    return {f"{sub}/{name}" for sub in ("shards", "progress") if (out / sub).is_dir()
            for name in os.listdir(out / sub)}


def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(llama_dir, txt_file, reference, tmp_path):
    out = tmp_path / "out"
    args = encode_args(llama_dir, txt_file, out, "--shard-size", "3")  # 15 shards: many commit points
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV)}
    rng = random.Random(12)
    for _ in range(3):
        before = written_files(out)
        process = subprocess.Popen([sys.executable, "-m", "llm2vec_fast", *args], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Startup (imports, model loading) takes seconds: wait until this run writes its first shard file, so
        # that the kill lands among the shard writes, at a random moment.
        while process.poll() is None and written_files(out) == before:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert main(args) == 0
    assert temp_files(out) == []
    embeddings, lines = load_embeddings(str(out))
    np.testing.assert_array_equal(lines, reference[1])
    reference_3 = tmp_path / "reference"
    assert main(encode_args(llama_dir, txt_file, reference_3, "--shard-size", "3")) == 0
    np.testing.assert_array_equal(embeddings, load_embeddings(str(reference_3))[0])
