"""Training guards of issue 22: one writer per output; a resume refuses changed data or model files; a crafted or
inconsistent checkpoint is skipped with a message, never a traceback; option ranges, config files and supervised
data are named before any model loads.

Classes (issue 22's severities): a second writer and a resume over changed inputs would lose or mix data (data
loss / silent wrong result); crafted checkpoints and config files crashed (raw traceback); out-of-range options
trained wrongly (silent wrong result); supervised data errors named no line (unclear error).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from llm2vec_fast.files import sha256_file
from llm2vec_fast.train.config import TrainConfig
from llm2vec_fast.train.data import DataError, read_supervised, read_texts
from test_train_reliability import (copy_run, finished_run, logged_losses, subprocess_env, text_file,  # noqa: F401
                                    train_cli, train_command)
from tiny_models import corpus

# ------------------------------------------------------------------------------------ one writer per output


def test_a_second_run_into_an_output_in_use_is_refused_naming_the_holder(llama_dir, text_file, tmp_path, capsys):
    output = tmp_path / "busy"
    first = subprocess.Popen(train_command(llama_dir, text_file, output, "--steps", "100000", "--save-steps",
                                           "100000"), env=subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (output / "train_log.jsonl").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.05)
        before = sorted(os.listdir(output))
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert train_cli(llama_dir, text_file, output, *flags) == 1
            error = capsys.readouterr().err
            assert error.count("\n") == 1, error
            assert f"is in use by another run (llm2vec-fast train, PID {first.pid}" in error, error
        assert first.poll() is None  # the first run was not disturbed
        assert sorted(os.listdir(output)) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)


def test_a_second_thread_training_into_the_same_output_is_refused(llama_dir, text_file, tmp_path):
    from llm2vec_fast.errors import UserError
    from llm2vec_fast.train.output import hold_output

    config = TrainConfig.for_stage("mntp", model=llama_dir, data=text_file, output=str(tmp_path / "out"))
    outcome = []
    with hold_output(config, resume=False, overwrite=False):
        def second():
            try:
                with hold_output(config, resume=False, overwrite=False):
                    outcome.append("entered")
            except UserError as error:
                outcome.append(str(error))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        with hold_output(config, resume=False, overwrite=False):  # the same thread re-enters its own hold
            pass
    assert len(outcome) == 1 and "is in use by another run" in outcome[0]
    with hold_output(config, resume=False, overwrite=False):  # released: free again
        pass


def test_a_foreign_directory_gets_no_lock_file(llama_dir, text_file, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert train_cli(llama_dir, text_file, foreign) == 1
    assert "files training did not write ('notes.txt')" in capsys.readouterr().err
    assert os.listdir(foreign) == ["notes.txt"]


# ----------------------------------------------------------------- resume checks the data and the model files

def scale_weights(model_dir, factor):
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    save_file({name: t * factor if t.is_floating_point() else t for name, t in tensors.items()}, path,
              metadata={"format": "pt"})


def test_resume_refuses_changed_data_or_base_weights_and_resumes_unchanged_exactly(llama_dir, text_file,
                                                                                   finished_run, tmp_path, capsys):
    model, data = str(tmp_path / "model"), str(tmp_path / "data.txt")
    shutil.copytree(llama_dir, model)
    shutil.copyfile(text_file, data)
    output = str(tmp_path / "killed")
    killed = subprocess.run(train_command(model, data, output), env=subprocess_env(**{FAULT_ENV:
                                                                                        "checkpoint:4:renamed"}),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["step-2", "step-4"]
    with open(os.path.join(output, "train_inputs.json")) as f:
        recorded = json.load(f)
    assert recorded["data_sha256"] == sha256_file(data) and "model.safetensors" in recorded["model_files"]

    original = open(data).read()
    with open(data, "w") as f:
        f.write("\n".join(reversed(original.splitlines())) + "\n")
    assert train_cli(model, data, output, "--resume") == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"cannot resume the run in {output}: since it started, the training data " \
        f"{data} changed" in error and "--output" in error and "--overwrite" in error, error
    with open(data, "w") as f:
        f.write(original)

    shutil.copyfile(os.path.join(model, "model.safetensors"), str(tmp_path / "weights"))
    scale_weights(model, 1.01)
    assert train_cli(model, data, output, "--resume") == 1
    error = capsys.readouterr().err
    assert "the --model files" in error and "changed: model.safetensors" in error, error
    shutil.copyfile(str(tmp_path / "weights"), os.path.join(model, "model.safetensors"))

    assert sorted(os.listdir(os.path.join(output, "checkpoints"))) == ["step-2", "step-4"]  # nothing was touched
    assert train_cli(model, data, output, "--resume") == 0, capsys.readouterr().err
    assert logged_losses(output) == logged_losses(finished_run)  # bitwise the uninterrupted run
    resumed = load_file(os.path.join(output, "adapter_model.safetensors"))
    reference = load_file(os.path.join(finished_run, "adapter_model.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_refuses_a_changed_peft_adapter(llama_dir, tmp_path, capsys):
    from llm2vec_fast.train.output import check_same_inputs, input_fingerprint, record_inputs
    from llm2vec_fast.errors import UserError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": llama_dir, "r": 2}))
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    data = tmp_path / "data.txt"
    data.write_text("a text\n")
    output = tmp_path / "out"
    output.mkdir()
    config = TrainConfig.for_stage("simcse", model=llama_dir, peft_model=str(adapter), data=str(data),
                                   output=str(output))
    record_inputs(str(output), input_fingerprint(config))
    check_same_inputs(config)  # unchanged: accepted
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    with pytest.raises(UserError, match=r"the --peft-model files \(.*adapter\) changed: adapter_model.safetensors"):
        check_same_inputs(config)


# --------------------------------------------------------------- crafted checkpoints: skipped, never a crash

def rewrite_manifest(directory, step=None):
    """Make checkpoint.json agree with the files as they are now (a crafted checkpoint with consistent hashes)."""
    path = os.path.join(directory, "checkpoint.json")
    with open(path) as f:
        manifest = json.load(f)
    if step is not None:
        manifest["step"] = step
    manifest["files"] = {name: dict(size=os.path.getsize(os.path.join(directory, name)),
                                    sha256=sha256_file(os.path.join(directory, name))) for name in manifest["files"]}
    with open(path, "w") as f:
        json.dump(manifest, f)


def edit_state(directory, change):
    path = os.path.join(directory, "trainer_state.json")
    with open(path) as f:
        state = json.load(f)
    change(state)
    with open(path, "w") as f:
        json.dump(state, f)


def bad_header(directory, name):
    with open(os.path.join(directory, name), "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))  # a header length far beyond the file


def deep_json(directory):
    with open(os.path.join(directory, "trainer_state.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)


def wrong_adapter_shape(directory):
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    save_file(tensors, path, metadata={"format": "pt"})


def wrong_moment_shape(directory):
    path = os.path.join(directory, "trainer_state.safetensors")
    tensors = load_file(path)
    with open(os.path.join(directory, "trainer_state.json")) as f:
        key = json.load(f)["optimizer"]["state"]["__items__"][0][1]["exp_avg"]["__tensor__"]
    tensors[key] = tensors[key].flatten()[:1].clone()
    save_file(tensors, path)


def wrong_torch_rng(directory):
    path = os.path.join(directory, "trainer_state.safetensors")
    tensors = load_file(path)
    with open(os.path.join(directory, "trainer_state.json")) as f:
        key = json.load(f)["rng"]["torch"]["__tensor__"]
    tensors[key] = tensors[key][:100].clone()
    save_file(tensors, path)


def wrong_python_rng(directory):
    edit_state(directory, lambda s: s["rng"].update(python={"__tuple__": [3, {"__tuple__": [1, 2, 3]}, None]}))


def step_value(value):
    return lambda directory: edit_state(directory, lambda s: s.update(step=value))


CRAFTED = {
    "bad-state-header": (lambda d: bad_header(d, "trainer_state.safetensors"), "its trainer state does not decode"),
    "bad-adapter-header": (lambda d: bad_header(d, "adapter_model.safetensors"),
                           "adapter_model.safetensors does not decode"),
    "100k-deep-json": (deep_json, "its trainer state is nested too deeply to read"),
    "adapter-shape": (wrong_adapter_shape, "its adapter tensor"),
    "moment-shape": (wrong_moment_shape, "its optimizer's exp_avg of a"),
    "torch-rng": (wrong_torch_rng, "its RNG state is not a generator state"),
    "python-rng": (wrong_python_rng, "its RNG state is not a generator state"),
    "step-1e9": (step_value(1e9), "its step 1000000000.0 is not a whole number"),
    "step-minus-4": (step_value(-4), "its step -4 is not a whole number of steps >= 0"),
    "step-other": (step_value(2), "its trainer state is of step 2, but its directory and manifest of step 4"),
    "lr-schedule": (lambda d: edit_state(d, lambda s: s["scheduler"].update(last_epoch=0)),
                    "its learning-rate schedule is at step 0"),
    "options": (lambda d: edit_state(d, lambda s: s["config"].update(learning_rate=0.5)),
                "it was written with other options than the run's (learning_rate)"),
    "betas": (lambda d: edit_state(d, lambda s: s["optimizer"]["param_groups"][0].update(
        betas={"__tuple__": [0.5, 0.5]})), "its optimizer's betas is (0.5, 0.5)"),
}


@pytest.mark.parametrize("craft", CRAFTED, ids=list(CRAFTED))
def test_a_crafted_checkpoint_is_skipped_for_the_older_one(llama_dir, text_file, finished_run, tmp_path, capsys,
                                                            craft):
    output = copy_run(finished_run, tmp_path)
    newest = os.path.join(output, "checkpoints", "step-4")
    change, why = CRAFTED[craft]
    change(newest)
    rewrite_manifest(newest)
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    error = capsys.readouterr().err
    skipped = [line for line in error.splitlines() if line.startswith("skipping checkpoint")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping checkpoint {newest}: {why}"), error
    assert "Traceback" not in error
    assert logged_losses(output) == logged_losses(finished_run)  # resumed from step-2, bitwise


def test_a_checkpoint_beyond_the_runs_steps_is_skipped(llama_dir, text_file, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    checkpoints = os.path.join(output, "checkpoints")
    beyond = os.path.join(checkpoints, "step-1000000000")
    shutil.copytree(os.path.join(checkpoints, "step-4"), beyond)

    def far(state):
        state["step"] = 1_000_000_000
        state["scheduler"]["last_epoch"] = 1_000_000_000

    edit_state(beyond, far)
    rewrite_manifest(beyond, step=1_000_000_000)
    os.remove(os.path.join(output, "adapter_model.safetensors"))
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    error = capsys.readouterr().err
    assert f"skipping checkpoint {beyond}: its step 1000000000 lies beyond --steps 6" in error, error
    assert logged_losses(output) == logged_losses(finished_run)  # from step-4: not finished at once


def test_no_valid_checkpoint_starts_afresh_with_a_message(llama_dir, text_file, finished_run, tmp_path, capsys):
    output = copy_run(finished_run, tmp_path)
    for step in (2, 4):
        directory = os.path.join(output, "checkpoints", f"step-{step}")
        wrong_adapter_shape(directory)
        rewrite_manifest(directory)
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    error = capsys.readouterr().err
    assert error.count("skipping checkpoint") == 2 and "no intact checkpoint" in error and \
        "starting from step 0" in error, error
    assert logged_losses(output) == logged_losses(finished_run)


def test_a_checkpoint_failing_half_applied_is_rolled_back(llama_dir, text_file, finished_run, tmp_path, capsys,
                                                          monkeypatch):
    """A checkpoint that fails while being applied leaves nothing applied: with both failing, the run starts
    afresh exactly as the uninterrupted run did (adapter, optimizer, schedule and generators as before)."""
    from llm2vec_fast.train import loop

    output = copy_run(finished_run, tmp_path)
    original, calls = loop._set_rng_state, []

    def failing(state):
        calls.append(1)
        if len(calls) % 2:  # each checkpoint's own state; the roll-back that follows succeeds
            raise RuntimeError("injected")
        original(state)

    monkeypatch.setattr(loop, "_set_rng_state", failing)
    assert train_cli(llama_dir, text_file, output, "--resume") == 0
    error = capsys.readouterr().err
    assert error.count("(RuntimeError: injected)") == 2 and "starting from step 0" in error, error
    assert logged_losses(output) == logged_losses(finished_run)


# ---------------------------------------------------------- option ranges, before any model loads


@pytest.fixture
def no_model_loads(monkeypatch):
    from llm2vec_fast.cli import train as train_cli_module

    def refuse(*args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_cli_module, "_make_stage", refuse)


@pytest.mark.parametrize("stage,flag,value,rule", [
    ("mntp", "--warmup-steps", "-5", "an integer >= 0"),
    ("mntp", "--mlm-probability", "0", "a share in (0, 1)"),
    ("mntp", "--mlm-probability", "1", "a share in (0, 1)"),
    ("mntp", "--mlm-probability", "1.5", "a share in (0, 1)"),
    ("mntp", "--steps", "0", "an integer >= 1"),
    ("mntp", "--batch-size", "-1", "an integer >= 1"),
    ("mntp", "--save-steps", "0", "an integer >= 1"),
    ("mntp", "--block-size", "1", "an integer >= 2"),
    ("mntp", "--learning-rate", "0", "a finite number > 0"),
    ("mntp", "--learning-rate", "-1e-4", "a finite number > 0"),
    ("mntp", "--learning-rate", "nan", "a finite number > 0"),
    ("mntp", "--learning-rate", "inf", "a finite number > 0"),
    ("mntp", "--seed", "-1", "an integer in [0, 4294967295]"),
    ("mntp", "--seed", "4294967296", "an integer in [0, 4294967295]"),
    ("simcse", "--attention-dropout", "1", "in [0, 1)"),
    ("simcse", "--attention-dropout", "-0.1", "in [0, 1)"),
    ("simcse", "--max-length", "0", "an integer >= 1"),
    ("simcse", "--gradcache-chunk", "-2", "an integer >= 0"),
])
def test_an_out_of_range_option_is_named_with_its_range(llama_dir, text_file, tmp_path, capsys, no_model_loads,
                                                         stage, flag, value, rule):
    output = tmp_path / "out"
    status = cli_main(["train", stage, "--model", llama_dir, "--data", text_file, "--output", str(output),
                       f"{flag}={value}"])
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1, error
    assert f"llm2vec-fast: error: {flag} " in error and "is out of range: it must be " + rule in error, error
    assert not output.exists()


@pytest.mark.parametrize("key,value,message", [
    ("weight_decay", -0.1, "weight_decay = -0.1 (a config file option) is out of range: it must be a finite number "
                           ">= 0"),
    ("max_grad_norm", 0, "max_grad_norm = 0.0 (a config file option) is out of range"),
    ("lora_dropout", 1.0, "lora_dropout = 1.0 (a config file option) is out of range: it must be in [0, 1)"),
    ("lora_r", 0, "lora_r = 0 (a config file option) is out of range: it must be an integer >= 1"),
    ("lora_alpha", -8, "lora_alpha = -8 (a config file option) is out of range"),
    ("random_replace_prob", 1.5, "random_replace_prob = 1.5 (a config file option) is out of range"),
    ("lora_targets", [], "lora_targets = []: expected a non-empty list of module names"),
    ("device", "gpu", "--device 'gpu': expected cpu, cuda or cuda:N"),
])
def test_an_out_of_range_config_file_option_is_named(tmp_path, key, value, message):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ValueError) as error:
        TrainConfig.for_stage("mntp", str(path), data="x.txt", output="out")
    assert message in str(error.value)


def test_range_messages_name_the_flags_the_cli_has():
    from llm2vec_fast.cli.train import _FLAGS
    from llm2vec_fast.train import config

    assert config._FLAGGED == {flag[2:].replace("-", "_") for flag in _FLAGS}


def test_large_seeds_do_not_overflow_the_example_generator():
    from llm2vec_fast.train.loop import example_generator

    example_generator(4294967295, 10**6, 10**6)  # within the generator's seed range: no overflow
    assert example_generator(42, 3, 7).initial_seed() == (42 * 1_000_003 + 3) * 10_000_019 + 7  # as ever


# ------------------------------------------------------------------------ config files named, never a traceback

@pytest.mark.parametrize("name,text,message", [
    ("syntax.yaml", "steps: 10\nlora_targets: [q_proj, k_proj\n", "invalid YAML at line 3, column 1"),
    ("tag.yaml", "steps: !!python/object/apply:os.mkdir [MARKER]\n",
     "the tag !!python/object/apply:os.mkdir at line 1, column 8 is refused"),
    ("name.yml", "steps: !!python/name:os.system\n", "the tag !!python/name:os.system at line 1, column 8 is refused"),
    ("deep.yaml", "steps: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply to read"),
    ("deep.json", '{"steps": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply to read"),
    ("keys.yaml", "1: 2\n", "key 1 is not an option name"),
    ("latin1.json", None, "not valid UTF-8"),
])
def test_a_bad_config_file_is_named_in_one_line(llama_dir, text_file, tmp_path, capsys, no_model_loads, name, text,
                                               message):
    path = tmp_path / name
    marker = tmp_path / "code-ran"
    if text is None:
        path.write_bytes('{"mask_token": "caf\u00e9"}'.encode("latin-1"))
    else:
        path.write_text(text.replace("MARKER", str(marker)))
    status = cli_main(["train", "mntp", "--config", str(path), "--model", llama_dir, "--data", text_file,
                       "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert status == 1 and error.count("\n") == 1 and f"config file {path}" in error and message in error, error
    assert not marker.exists()


def test_config_files_are_read_with_yaml_safe_load():
    import inspect

    from llm2vec_fast.train import reference_config

    source = inspect.getsource(reference_config)
    assert "yaml.safe_load(" in source and "yaml.load(" not in source and "yaml.unsafe_load" not in source


# -------------------------------------------------------- training data named by file:line, before the model

def write_jsonl(path, rows, bad_line, bad):
    """JSONL of `rows` with `bad` (raw text) as line `bad_line`, and a blank line before it (lines count it)."""
    lines = [json.dumps(row) for row in rows]
    lines.insert(bad_line - 2, "")
    lines.insert(bad_line - 1, bad)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def shown(message, error):
    """`message` is in `error`; "JSON nested DEEP" stands for either reader's words for a line nested too deeply
    (the shared line reader's depth limit, or the training reader's own guard against a RecursionError)."""
    if message == "JSON nested DEEP":
        return "JSON nested" in error and "deep" in error
    return message in error


GOOD = [dict(query=f"question {i}", positive=f"answer {i}", negative=f"other {i}") for i in range(30)]


@pytest.mark.parametrize("bad,message", [
    ('{"query": "q", "positive": "p", "instruction": 5}', "field 'instruction' is a number (5); it must be a string"),
    ('{"query": "q", "positive": "p", "dataset": ["a"]}', "field 'dataset' is a list; it must be a string"),
    ('{"query": "q", "positive": "p", "negative": [1, 2]}', "field 'negative' is a list; it must be a string or a "
                                                            "list of non-empty strings"),
    ('{"query": "q", "positive": "p", "negative": "n", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "JSON nested DEEP"),
    ('{"query": "q\\ud800", "positive": "p"}', "field 'query' holds a lone surrogate (\\ud800 at character 2)"),
    ('{"query": "q", "positive": "p", "negative": ["n", "\\udfff"]}', "field 'negative' holds a lone surrogate"),
    ('{"query": "q", "positive": "p", "instruction": "\\ud83d do this:"}', "field 'instruction' holds a lone "
                                                                           "surrogate"),
])
def test_bad_supervised_data_is_named_by_file_and_line_before_the_model_loads(llama_dir, tmp_path, monkeypatch,
                                                                              bad, message):
    from llm2vec_fast.train import supervised

    def refuse(config):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(supervised, "load_encoder", refuse)
    data = write_jsonl(tmp_path / "triples.jsonl", GOOD, 25, bad)
    config = TrainConfig.for_stage("supervised", model=llama_dir, data=data, output=str(tmp_path / "out"))
    with pytest.raises(DataError) as error:
        supervised.SupervisedStage(config)
    assert str(error.value).startswith(f"{data}:25: ") and shown(message, str(error.value)), str(error.value)


def test_supervised_data_error_is_one_line_from_the_cli(llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "triples.jsonl", GOOD, 25, '{"query": "q", "positive": "p", "instruction": 5}')
    assert cli_main(["train", "supervised", "--model", llama_dir, "--data", data, "--output",
                     str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"{data}:25: field 'instruction' is a number (5)" in error, error


def test_supervised_optional_fields_may_be_absent_or_null(tmp_path):
    data = write_jsonl(tmp_path / "triples.jsonl", GOOD, 3, json.dumps(dict(query="q", positive="p", negative=None,
                                                                             instruction=None, dataset=None)))
    examples = read_supervised(data)
    assert examples[1] == dict(query="q", positive="p", negative=[], instruction="", dataset="")  # line 3
    assert examples[0] == dict(query="question 0", positive="answer 0", negative=["other 0"], instruction="",
                               dataset="")


@pytest.mark.parametrize("bad,message", [
    ('{"text": "a \\udc80 b"}', "field 'text' holds a lone surrogate (\\udc80 at character 3)"),
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested DEEP"),
])
def test_bad_text_jsonl_is_named_by_file_and_line(tmp_path, bad, message):
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in corpus(30, seed=4)], 25, bad)
    with pytest.raises(DataError) as error:
        read_texts(data)
    assert str(error.value).startswith(f"{data}:25: ") and shown(message, str(error.value)), str(error.value)


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, "{cut short", "[1, 2]"],
                         ids=["deep", "cut-short", "not-an-object"])
def test_a_damaged_run_record_is_one_error_naming_the_file(tmp_path, content):
    from llm2vec_fast.errors import UserError
    from llm2vec_fast.train.output import INPUTS, RUN_CONFIG, stored_config, stored_inputs

    for name, read in ((RUN_CONFIG, stored_config), (INPUTS, stored_inputs)):
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=rf"{name} (does not hold training options|is damaged).*--overwrite"):
            read(str(tmp_path))
