"""output_lock.py: one run per output directory; the holder is named; a killed holder leaves no stale lock."""

import os
import signal
import subprocess
import sys

import pytest

from llm2vec_fast.cli import main
from llm2vec_fast.errors import UserError
from llm2vec_fast.output_lock import OutputLock
from encode_helpers import encode_args, error_of, texts, txt_file  # noqa: F401 (fixtures)


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with OutputLock(str(tmp_path), 0, "llm2vec-fast encode"):
        with pytest.raises(UserError, match=rf"is in use by another run \(llm2vec-fast encode, PID {os.getpid()} on "):
            OutputLock(str(tmp_path), 0).acquire()
        OutputLock(str(tmp_path), 1).acquire().release()  # another rank of the same run has its own lock
    OutputLock(str(tmp_path), 0).acquire().release()  # released: free again


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from llm2vec_fast.output_lock import OutputLock; "
        f"OutputLock({str(tmp_path)!r}, 0).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"PID {holder.pid}"):
            OutputLock(str(tmp_path), 0).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    OutputLock(str(tmp_path), 0).acquire().release()


def test_a_planted_lock_link_is_refused(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / ".llm2vec-fast-rank0.lock")
    with pytest.raises(UserError, match="is a symbolic link"):
        OutputLock(str(tmp_path), 0).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_encode_into_an_output_another_run_writes_is_refused(llama_dir, txt_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(str(out), 0, "llm2vec-fast encode"):
        err = error_of(encode_args(llama_dir, txt_file, out), capsys)
    assert "is in use by another run (llm2vec-fast encode, PID" in err and "would mix their results" in err
    assert sorted(os.listdir(out)) == [".llm2vec-fast-rank0.lock"]  # nothing written
    assert main(encode_args(llama_dir, txt_file, out)) == 0  # the lock file left behind is ours, not foreign
