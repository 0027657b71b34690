"""The command line answers at once (issue 23, item 2): `--help`, `--version`, a mistyped option and a missing
file are answered without importing torch, transformers or numpy; errors are short and suggest what was meant;
the values --help shows without importing their owners equal their owners'; --threads, the busy-machine hint, the
C++ build before the encode's rate, the dtype line once per output folder, and no `hf download` hint for a path.

Start-up is asserted through what a fresh interpreter imported (sys.modules after main() returns), never through
wall-clock time, which depends on the machine's load.
"""

import json
import os
import subprocess
import sys

import pytest

import llm2vec_fast
from llm2vec_fast.cli import main
from llm2vec_fast.cli import encode as encode_cli, options

HEAVY = ("torch", "transformers", "numpy", "huggingface_hub", "pyarrow", "tqdm")

# Runs main(argv) in a fresh interpreter and prints, last on stderr, the exit status and the heavy modules loaded.
PROBE = """
import json, sys
from llm2vec_fast.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
heavy = [name for name in {heavy!r} if name in sys.modules]
print("PROBE " + json.dumps(dict(code=code, heavy=heavy)), file=sys.stderr)
""".format(heavy=HEAVY)


def run_cli(*argv, cwd=None):
    """(exit status, heavy modules imported, stdout, stderr without the probe line) of `llm2vec-fast *argv`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                            cwd=cwd, env=env)
    *lines, probe = result.stderr.rstrip("\n").split("\n")
    assert probe.startswith("PROBE "), result.stderr[-3000:]
    found = json.loads(probe[len("PROBE "):])
    return found["code"], found["heavy"], result.stdout, "\n".join(lines)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.txt"
    path.write_text("a first text\na second text\n")
    return str(path)


@pytest.mark.parametrize("argv", [
    ["--help"], ["encode", "--help"], ["train", "--help"], ["eval", "similarity", "--help"],
    ["eval", "probe", "--help"], ["env", "--help"], ["setup-default-model", "--help"], ["export", "--help"],
], ids=" ".join)
def test_help_imports_nothing_heavy(argv):
    code, heavy, out, _ = run_cli(*argv)
    assert code == 0 and heavy == [] and "usage: llm2vec-fast" in out


def test_version_prints_the_package_version_without_torch():
    code, heavy, out, _ = run_cli("--version")
    assert (code, heavy, out) == (0, [], f"llm2vec-fast {llm2vec_fast.__version__}\n")


def test_a_mistyped_option_gets_a_short_did_you_mean():
    code, heavy, _, err = run_cli("encode", "--input", "x.txt", "--ouput", "out")
    assert code == 2 and heavy == []
    assert err.splitlines() == ["llm2vec-fast encode: error: unrecognized option --ouput; did you mean --output?",
                                "llm2vec-fast encode: run 'llm2vec-fast encode --help' for the options"]


@pytest.mark.parametrize("argv, message", [
    (["encod"], "invalid choice: 'encod'"),
    (["encode", "--input", "x", "--output", "y", "--pooling", "maen"], "did you mean 'mean'?"),
    (["train", "simcse", "--dataa", "x.txt"], "unrecognized option --dataa; did you mean --data?"),
    (["eval", "similarity", "--modle", "m"], "unrecognized option --modle; did you mean --model?"),
    (["encode", "--input", "x", "--output", "y", "--threads", "0"], "argument --threads: expected a positive"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_argument_errors_are_short_and_import_nothing_heavy(argv, message):
    code, heavy, _, err = run_cli(*argv)
    assert code == 2 and heavy == [] and message in err and len(err.splitlines()) == 2, err


def test_missing_files_are_refused_before_torch(tmp_path, data_file):
    out = str(tmp_path / "out")
    cases = [
        (["encode", "--input", "no-such-file.txt", "--output", out], "input file 'no-such-file.txt' does not exist"),
        (["encode", "--input", data_file, "--output", "-"], "--output - (stdout) is not supported"),
        (["encode", "--input", data_file, "--output", out, "--model", "./no-such-model"],
         "--model './no-such-model': no such directory"),
        (["encode", "--input", data_file, "--output", out, "--peft-model", str(tmp_path / "no-adapter")],
         "no such directory"),
        (["train", "simcse", "--data", "missing.jsonl", "--output", out], "--data 'missing.jsonl': no such file"),
        (["train", "simcse", "--data", str(tmp_path), "--output", out], "is a directory"),
        (["train", "simcse", "--data", data_file, "--output", out, "--model", "../no-such-model"],
         "no such directory"),
        (["train", "mntp", "--data", data_file, "--output", out, "--save-max-length"], "mntp has no --max-length"),
        (["eval", "similarity", "--model", "./no-such-model"], "no such directory"),
        (["eval", "probe", "--model", "./no-such-model", "--train", "a", "--eval", "b"], "no such directory"),
        (["export", "--model", "./no-such-model", "--output", out], "no such directory"),
        (["export", "--adapter", "./no-adapter", "--output", out], "no such directory"),
        (["export", "--output", out, "--prompt", "q=find:", "--default-prompt", "p"], "names no --prompt"),
        (["export", "--output", data_file], "is a file"),
    ]
    for argv, message in cases:
        code, heavy, _, err = run_cli(*argv, cwd=str(tmp_path))
        assert code == 1 and heavy == [], (argv, heavy, err)
        assert message in err and err.count("\n") == 0 and "hf download" not in err, (argv, err)


def test_train_refuses_a_foreign_output_before_torch(tmp_path, data_file):
    model, out = tmp_path / "model", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, heavy, _, err = run_cli("train", "simcse", "--model", str(model), "--data", data_file, "--output", str(out))
    assert code == 1 and heavy == [] and "files training did not write" in err, err


def test_the_modules_that_use_the_choices_take_them_from_their_one_owner():
    """--help shows these values without importing the modules that use them (torch, numpy): llm2vec_fast/choices.py
    sets each once, and those modules read it there."""
    from llm2vec_fast import batching, choices, precision
    from llm2vec_fast.encode_job import config, corpus, shard_formats, sources, tables

    assert batching.POOLING_MODES is choices.POOLING_MODES
    assert precision.DEFAULT_MAX_BATCH_TOKENS is choices.DEFAULT_MAX_BATCH_TOKENS
    assert sources.FORMATS == choices.INPUT_FORMATS and corpus.FORMATS is choices.LINE_FORMATS
    assert tables.TABLE_FORMATS is choices.TABLE_FORMATS
    assert shard_formats.OUTPUT_FORMATS is choices.OUTPUT_FORMATS
    assert config.DEFAULT_SHARD_SIZE == choices.DEFAULT_SHARD_SIZE
    assert corpus.MAX_LINE_BYTES == choices.MAX_LINE_BYTES


def test_batch_token_help_names_both_cpu_defaults():
    from llm2vec_fast.precision import default_max_batch_tokens

    import torch

    text = options._batch_tokens_help()
    assert f"default: {default_max_batch_tokens('cpu')} on CPU with float32" in text
    assert f"{default_max_batch_tokens('cpu', torch.bfloat16)} with bf16" in text
    assert f"{default_max_batch_tokens('cuda')} on CUDA" in text


@pytest.mark.parametrize("name, path_like", [
    ("./no-such-model", True), ("../models/x", True), ("/abs/model", True), ("~/model", True),
    ("a/b/c", True), ("owner/name/", True), ("owner/name", False), ("gpt2", False),
    ("McGill-NLP/LLM2Vec-Sheared-LLaMA-mntp", False),
])
def test_only_hub_ids_are_left_to_the_hub_lookup(name, path_like):
    assert options.looks_like_path(name) is path_like


def test_a_missing_local_model_never_suggests_hf_download(tmp_path, data_file, capsys):
    for model in ("./no-such-model", str(tmp_path / "no-such-model"), "no/such/model"):
        assert main(["encode", "--model", model, "--input", data_file, "--output", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert "no such directory" in err and "hf download" not in err, err


# ------------------------------------------------------------------------------------ threads and the rate

def test_threads_sets_torchs_thread_count():
    import torch

    previous = torch.get_num_threads()
    try:
        options.apply_threads(1)
        assert torch.get_num_threads() == 1
        options.apply_threads(None)  # unset: torch's choice stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("load, cpus, threads, hinted", [
    (3.5, 2, 2, True), (1.5, 2, 2, False), (4.0, 2, 1, False), (None, 2, 2, False),
], ids=["busy", "idle", "one-thread-already", "no-load-average"])
def test_a_busy_machine_gets_a_one_line_threads_hint(monkeypatch, capsys, load, cpus, threads, hinted):
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    encode_cli._hint_if_busy(load, threads)
    err = capsys.readouterr().err
    assert (("--threads N with N below 2" in err and f"load average {load:.1f} on {cpus} CPUs" in err
             and err.count("\n") == 1) if hinted else err == "")


@pytest.fixture
def fake_encode(monkeypatch):
    """The encode job and the C++ build replaced by stubs that record their order; the job's stub says the auto
    dtype line (as resolving --dtype auto does) and writes a fingerprint recording the dtype."""
    from llm2vec_fast import cpu_linear, native
    from llm2vec_fast.encode_job import job

    calls = []

    def fake_run(config):
        calls.append("encode")
        cpu_linear.announce_cpu_dtype("float32", "no native bf16 matmul (AVX-512 BF16 / AMX) on this CPU")
        os.makedirs(config.output, exist_ok=True)
        with open(os.path.join(config.output, "fingerprint.json"), "w") as f:
            json.dump({"dtype": "float32"}, f)
        return 0

    monkeypatch.setattr(native, "load", lambda: calls.append("build"))
    monkeypatch.setattr(job, "run", fake_run)
    monkeypatch.setattr(cpu_linear, "_announced", set())
    return calls


def test_the_build_comes_before_the_encode_and_the_threads_are_reported(fake_encode, tmp_path, data_file, capsys):
    import torch

    argv = ["encode", "--model", str(tmp_path), "--input", data_file, "--output", str(tmp_path / "out"),
            "--device", "cpu", "--threads", "1", "--no-progress"]
    previous = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(previous)
    assert fake_encode == ["build", "encode"]  # the encode's rate starts after the build
    assert "llm2vec-fast: encoded on 1 CPU thread (--threads N to change)." in capsys.readouterr().err


def test_the_busy_hint_follows_the_rate_of_a_finished_encode_only(fake_encode, tmp_path, data_file, capsys,
                                                                   monkeypatch):
    """Measured before the run (its own threads would count), printed after it: an error stays one line."""
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    argv = ["encode", "--model", str(tmp_path), "--input", data_file, "--device", "cpu", "--no-progress"]
    import torch

    previous = torch.get_num_threads()
    try:
        assert main([*argv, "--output", str(tmp_path / "out"), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(previous)
    assert capsys.readouterr().err.splitlines()[-1].startswith("llm2vec-fast: this machine was busy")
    assert main([*argv, "--output", "-"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_the_dtype_line_is_said_once_per_output_folder(fake_encode, tmp_path, data_file, capsys, monkeypatch):
    from llm2vec_fast import cpu_linear

    def argv(output, *extra):
        return ["encode", "--model", str(tmp_path), "--input", data_file, "--output", str(tmp_path / output),
                "--device", "cpu", "--no-progress", *extra]

    line = "llm2vec-fast: dtype='auto' on this CPU -> float32: no native bf16 matmul (AVX-512 BF16 / AMX) on this CPU\n"
    assert main(argv("out")) == 0
    assert line in capsys.readouterr().err and len(line) < 110
    monkeypatch.setattr(cpu_linear, "_announced", set())  # a new process
    assert main(argv("out")) == 0  # the folder's fingerprint records the dtype now
    assert "dtype='auto'" not in capsys.readouterr().err
    assert main(argv("out", "-v")) == 0
    assert line in capsys.readouterr().err
    monkeypatch.setattr(cpu_linear, "_announced", set())
    assert main(argv("other")) == 0  # another folder
    assert line in capsys.readouterr().err
