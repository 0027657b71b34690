"""Training never runs code from a file, never destroys what it did not write, stops on divergence, survives a
kill at any moment (checkpoint writes included) and names the file and line of bad data."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from llm2vec_fast.train.checkpoint import decode_state, encode_state
from llm2vec_fast.train.config import TrainConfig
from llm2vec_fast.train.data import DataError, read_jsonl, read_texts
from llm2vec_fast.files import TEMP_MARK
from llm2vec_fast.train.loop import train
from llm2vec_fast.train.mntp import MNTPStage
from llm2vec_fast.train.simcse import SimCSEStage
from llm2vec_fast.train.supervised import SupervisedStage
from tiny_models import corpus

# Six steps of tiny MNTP with a checkpoint every two: checkpoints step-2 and step-4, then the final adapter.
RUN = ["--steps", "6", "--save-steps", "2", "--batch-size", "2", "--block-size", "32", "--dtype", "float32",
       "--learning-rate", "1e-3", "--no-gradient-checkpointing", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(corpus(120, seed=11)) + "\n")
    return str(path)


def train_cli(model, data, output, *extra):
    return cli_main(["train", "mntp", "--model", model, "--data", data, "--output", str(output), *RUN, *extra])


def logged_losses(output):
    with open(os.path.join(output, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def temp_leftovers(output):
    return [os.path.join(root, name) for root, dirs, files in os.walk(output) for name in dirs + files
            if TEMP_MARK in name or name.endswith(".tmp")]


def tree_digest(directory):
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def finished_run(llama_dir, text_file, tmp_path_factory):
    """A completed run (its log is the uninterrupted reference for in-process resumes)."""
    output = tmp_path_factory.mktemp("finished") / "out"
    assert train_cli(llama_dir, text_file, output) == 0
    return str(output)


def copy_run(finished_run, tmp_path):
    output = str(tmp_path / "run")
    shutil.copytree(finished_run, output)
    return output


# ------------------------------------------------------------------------------- 1. no pickle from our files

class _CreatesMarker:
    """Unpickling this runs os.mkdir(marker): proof that a file executed code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_resume_refuses_a_planted_pickle_without_running_it(llama_dir, text_file, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    marker = str(tmp_path / "code-ran")
    planted = os.path.join(output, "checkpoints", "step-5")
    os.makedirs(planted)
    torch.save({"step": 5, "payload": _CreatesMarker(marker)}, os.path.join(planted, "trainer_state.pt"))
    assert train_cli(llama_dir, text_file, output, "--resume") == 1
    assert not os.path.exists(marker)
    error = capsys.readouterr().err
    assert "trainer_state.pt is a pickle" in error and "never loaded" in error and "--overwrite" in error


def test_checkpoint_holds_safetensors_and_json_only(finished_run):
    step = os.path.join(finished_run, "checkpoints", "step-4")
    assert sorted(os.listdir(step)) == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors",
                                               "checkpoint.json", "trainer_state.json", "trainer_state.safetensors"])
    with open(os.path.join(step, "trainer_state.json")) as f:
        state = json.load(f)
    assert state["step"] == 4 and state["config"]["steps"] == 6
    assert load_file(os.path.join(step, "trainer_state.safetensors"))  # optimizer moments and RNG states


def test_state_encoding_round_trips_and_refuses_objects():
    state = dict(optimizer={"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                            "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
                 rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state()))
    tensors, tree = encode_state(state)
    decoded = decode_state(json.loads(json.dumps(tree)), tensors)
    assert decoded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(decoded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert decoded["rng"]["python"] == state["rng"]["python"]
    numpy_state = decoded["rng"]["numpy"]
    assert numpy_state[0] == "MT19937" and np.array_equal(numpy_state[1], state["rng"]["numpy"][1])
    with pytest.raises(TypeError, match="cannot store a _CreatesMarker"):
        encode_state({"x": _CreatesMarker("never")})
    with pytest.raises(ValueError, match="numbers only"):
        decode_state({"__ndarray__": "0", "dtype": "O", "shape": [1]}, {"0": torch.zeros(8, dtype=torch.uint8)})


# ----------------------------------------------------------------- 2. never destroy the user's model or directory

def test_output_at_or_inside_the_model_or_holding_a_model_is_refused(llama_dir, text_file, tmp_path, capsys):
    model = str(tmp_path / "model")
    shutil.copytree(llama_dir, model)
    before = tree_digest(model)
    assert train_cli(model, text_file, model) == 1
    assert "is the --model directory" in capsys.readouterr().err
    assert train_cli(model, text_file, os.path.join(model, "out"), "--overwrite") == 1
    assert "lies inside the --model directory" in capsys.readouterr().err
    other = str(tmp_path / "other-model")
    shutil.copytree(llama_dir, other)
    assert train_cli(model, text_file, other, "--overwrite") == 1
    assert "holds a model (config.json, model.safetensors)" in capsys.readouterr().err
    assert tree_digest(model) == before and tree_digest(other) == tree_digest(llama_dir)


def test_non_empty_output_needs_resume_or_overwrite(llama_dir, text_file, finished_run, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for flags in ([], ["--overwrite"]):
        assert train_cli(llama_dir, text_file, foreign, *flags) == 1
        assert "files training did not write ('notes.txt')" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]
    output = copy_run(finished_run, tmp_path)
    assert train_cli(llama_dir, text_file, output) == 1
    error = capsys.readouterr().err
    assert "already holds a training run" in error and "--resume" in error and "--overwrite" in error


def test_overwrite_removes_only_training_files_and_never_reuses_old_checkpoints(llama_dir, text_file, finished_run,
                                                                                tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    with open(os.path.join(output, "notes.txt"), "w") as f:
        f.write("not ours")
    # A new run with other options and no checkpoint of its own: the old step-2 / step-4 must not be resumed.
    assert cli_main(["train", "mntp", "--model", llama_dir, "--data", text_file, "--output", output, "--steps", "3",
                     "--save-steps", "10", "--batch-size", "2", "--block-size", "24", "--dtype", "float32",
                     "--no-gradient-checkpointing", "--no-progress", "--overwrite"]) == 0
    assert os.listdir(os.path.join(output, "checkpoints")) == []
    assert len(logged_losses(output)) == 3
    with open(os.path.join(output, "notes.txt")) as f:
        assert f.read() == "not ours"
    assert train_cli(llama_dir, text_file, output, "--resume") == 1  # other options than the stored run
    assert "option(s) ['block_size', 'learning_rate'] differ" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- 3. non-finite values

def test_divergence_stops_names_the_step_and_keeps_the_last_good_checkpoint(llama_dir, text_file, tmp_path, capsys):
    output = tmp_path / "diverged"
    assert train_cli(llama_dir, text_file, output, "--learning-rate", "1e30", "--save-steps", "1") == 1
    error = capsys.readouterr().err
    assert "step 2: the loss is nan" in error and "diverged" in error
    assert f"the last good checkpoint {output / 'checkpoints' / 'step-1'} is kept" in error
    assert not (output / "adapter_model.safetensors").exists()
    assert os.listdir(output / "checkpoints") == ["step-1"]
    assert all(torch.isfinite(t).all() for t in load_file(str(output / "checkpoints" / "step-1" /
                                                               "adapter_model.safetensors")).values())
    assert len(logged_losses(output)) == 1


# ------------------------------------------------------------------------------ 4. interrupted training resumes

def test_damaged_checkpoints_are_skipped_with_a_fallback(llama_dir, text_file, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    reference = logged_losses(finished_run)
    checkpoints = os.path.join(output, "checkpoints")
    state = os.path.join(checkpoints, "step-4", "trainer_state.safetensors")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    os.makedirs(os.path.join(checkpoints, "step-6.tmp"))  # what older versions left after a kill
    os.makedirs(os.path.join(checkpoints, f".step-6{TEMP_MARK}x1"))
    shutil.copytree(os.path.join(checkpoints, "step-2"), os.path.join(checkpoints, "step-5"))
    os.remove(os.path.join(checkpoints, "step-5", "checkpoint.json"))  # killed before its manifest
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    error = capsys.readouterr().err
    assert f"skipping checkpoint {os.path.join(checkpoints, 'step-5')}: no checkpoint.json" in error
    assert f"skipping checkpoint {os.path.join(checkpoints, 'step-4')}: trainer_state.safetensors has" in error
    assert logged_losses(output) == reference  # resumed from step-2, bitwise the uninterrupted run
    assert temp_leftovers(output) == []


def test_resume_without_any_checkpoint_starts_over(llama_dir, text_file, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    shutil.rmtree(os.path.join(output, "checkpoints"))
    with open(os.path.join(output, "train_log.jsonl"), "a") as f:
        f.write('{"step": 7, "lo')  # a kill in the middle of a log append
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    assert "no intact checkpoint" in capsys.readouterr().err
    assert logged_losses(output) == logged_losses(finished_run)


def subprocess_env(**extra):
    # This process's thread count, so the subprocess computes bitwise like finished_run, the reference.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", FAULT_ENV)}
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **extra)
    return env


def train_command(model, data, output, *extra):
    return [sys.executable, "-m", "llm2vec_fast", "train", "mntp", "--model", model, "--data", data,
            "--output", str(output), *RUN, *extra]


def kill_at_random(command, output, seed):
    """Run `command` and SIGKILL it at a random moment from when the run owns `output` to beyond its end."""
    delay = random.Random(seed).uniform(0.0, 2.0)
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and not os.path.exists(os.path.join(output, "train_log.jsonl")):
            time.sleep(0.01)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=300)
    print(f"killed {delay:.3f} s after the log appeared (seed {seed})")  # shown if the test fails


def test_kills_mid_checkpoint_and_at_a_random_moment_then_resume_is_exact(llama_dir, text_file, finished_run,
                                                                           tmp_path):
    output = str(tmp_path / "out")
    killed = subprocess.run(train_command(llama_dir, text_file, output), env=subprocess_env(**{FAULT_ENV:
                                                                                                "checkpoint:4:state"}),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    left = sorted(os.listdir(os.path.join(output, "checkpoints")))
    assert left[0].startswith(".step-4" + TEMP_MARK) and left[1:] == ["step-2"]  # step 4 was being written
    kill_at_random(train_command(llama_dir, text_file, output, "--resume"), output,
                   seed=int.from_bytes(os.urandom(4), "little"))
    done = subprocess.run(train_command(llama_dir, text_file, output, "--resume"), env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_losses(output) == logged_losses(finished_run)  # bitwise the uninterrupted run
    resumed = load_file(os.path.join(output, "adapter_model.safetensors"))
    reference = load_file(os.path.join(finished_run, "adapter_model.safetensors"))
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert temp_leftovers(output) == []


# ------------------------------------------------------------------------------- 5. atomic, no symlink followed

def test_saving_replaces_planted_symlinks_instead_of_writing_through(llama_dir, text_file, finished_run, tmp_path):
    output = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = ("train_config.json", "train_log.jsonl", "adapter_config.json", "adapter_model.safetensors")
    for name in names:
        # The link's target is a copy of the file (training may read it) with one byte more, to tell them apart.
        with open(os.path.join(output, name), "rb") as f:
            (elsewhere / name).write_bytes(f.read() + b" ")
        os.remove(os.path.join(output, name))
        os.symlink(elsewhere / name, os.path.join(output, name))
    before = tree_digest(elsewhere)
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    assert tree_digest(elsewhere) == before
    assert not any(os.path.islink(os.path.join(output, name)) for name in names)
    assert logged_losses(output) == logged_losses(finished_run)


def test_a_finished_run_leaves_no_temporary_files_and_usual_modes(finished_run):
    assert temp_leftovers(finished_run) == []
    umask = os.umask(0)
    os.umask(umask)
    for path in (os.path.join(finished_run, "adapter_model.safetensors"),
                 os.path.join(finished_run, "checkpoints", "step-2", "trainer_state.json")):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(os.path.join(finished_run, "checkpoints", "step-2")).st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------------------- 6. clear errors for bad data

def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not valid UTF-8 \(byte 0xe9 at character 4\)"):
        read_texts(str(path))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"query": "a", "positive": "b"}\n{"query": "\xff", "positive": "b"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid UTF-8"):
        read_jsonl(str(jsonl), ("query", "positive"))


@pytest.mark.parametrize("separator", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_every_line_ending_separates_texts(tmp_path, separator):
    texts = corpus(20, seed=2)
    path = tmp_path / "texts.txt"
    path.write_bytes(separator.join(texts).encode() + separator.encode())
    assert read_texts(str(path)) == texts
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_bytes(separator.join(json.dumps({"text": t}) for t in texts).encode())
    assert read_texts(str(jsonl)) == texts


def small_config(stage, model, data, tmp_path, **kw):
    values = dict(model=model, data=str(data), output=str(tmp_path / "out"), dtype="float32",
                  gradient_checkpointing=False, steps=2)
    values.update(kw)
    return TrainConfig.for_stage(stage, **values)


def test_contrastive_stages_need_two_examples(llama_dir, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single sentence\n")
    with pytest.raises(DataError, match=r"one.txt: simcse needs at least 2 texts .*, found 1"):
        SimCSEStage(small_config("simcse", llama_dir, one, tmp_path, batch_size=2))
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n")
    with pytest.raises(DataError, match=r"pair.jsonl: supervised needs at least 2 examples .*, found 1"):
        SupervisedStage(small_config("supervised", llama_dir, pair, tmp_path, batch_size=2))
    two = tmp_path / "two.txt"
    two.write_text("one sentence\nanother sentence\n")
    with pytest.raises(DataError, match="--batch-size 1: simcse needs at least 2 examples per batch"):
        SimCSEStage(small_config("simcse", llama_dir, two, tmp_path, batch_size=1))


def test_batch_larger_than_the_data_is_refused(llama_dir, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n".join(corpus(5, seed=1)) + "\n")
    with pytest.raises(DataError, match=r"short.txt: 5 texts, fewer than one batch \(--batch-size 8\); lower "
                                        r"--batch-size to at most 5"):
        SimCSEStage(small_config("simcse", llama_dir, short, tmp_path, batch_size=8))
    with pytest.raises(DataError, match=r"blocks of up to 512 tokens, fewer than one batch \(--batch-size 32\)"):
        MNTPStage(small_config("mntp", llama_dir, text_file, tmp_path))


def test_library_train_refuses_a_used_output_too(llama_dir, text_file, finished_run, tmp_path):
    from llm2vec_fast.errors import UserError

    output = copy_run(finished_run, tmp_path)
    config = small_config("mntp", llama_dir, text_file, tmp_path, output=output, batch_size=2, block_size=32)
    with pytest.raises(UserError, match="already holds a training run"):
        train(MNTPStage(config), config, show_progress=False)
