"""`llm2vec-fast encode` end to end on a tiny Llama: round trips, stdin, resume after SIGKILL, argument mismatch,
bad lines, user errors, and a 2-process torchrun run that must equal the single-process one; then the CLI items of
issue 11: --peft-model, --output -, the output of a run that failed early, --no-progress, --help and choices."""

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main
from llm2vec_fast.encode_job import load_embeddings
from llm2vec_fast.encode_job.layout import MANIFEST
from llm2vec_fast.faults import VARIABLE as FAULT_ENV
from encode_helpers import (N_LINES, SHARD, assert_same_output, encode_args, private_hash_cache,  # noqa: F401
                            reference, subprocess_env, texts, txt_file)



@pytest.fixture(scope="module")
def model(llama_dir):
    return LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)


def test_txt_round_trip(reference, model, texts, tmp_path):
    embeddings, lines = reference
    assert embeddings.shape == (N_LINES, model.config.hidden_size) and embeddings.dtype == np.float32
    assert lines.tolist() == list(range(1, N_LINES + 1))
    expected = model.encode([texts[n - 1] for n in lines], show_progress_bar=False).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_manifest_describes_shards(llama_dir, txt_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["count"] == N_LINES and manifest["dim"] == 64 and manifest["pooling"] == "mean"
    assert [s["rows"] for s in manifest["shards"]] == [10, 10, 10, 10, 5]
    assert [s["row_start"] for s in manifest["shards"]] == [0, 10, 20, 30, 40]
    assert manifest["shards"][4]["first_line"] == 41 and manifest["shards"][4]["last_line"] == 45
    assert manifest["skipped"] == []
    assert_same_output(out, reference)


def test_jsonl_with_instructions_and_custom_fields(llama_dir, model, texts, tmp_path):
    path = tmp_path / "in.jsonl"
    records = [{"body": t, **({"query": f"topic {i}:"} if i % 3 == 0 else {})} for i, t in enumerate(texts[:30])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    args = encode_args(llama_dir, str(path), out, "--text-field", "body", "--instruction-field", "query",
                       "--instruction", "represent the text:", "--pooling", "weighted_mean")
    assert main(args) == 0
    embeddings, lines = load_embeddings(str(out))
    assert lines.tolist() == list(range(1, 31))
    pairs = [[r.get("query", "represent the text:"), r["body"]] for r in records]
    weighted = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32, pooling_mode="weighted_mean")
    expected = weighted.encode(pairs, show_progress_bar=False).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
    plain = model.encode([r["body"] for r in records], show_progress_bar=False).numpy()
    assert not np.allclose(embeddings, plain, atol=1e-3)  # the instructions and pooling were applied


def test_stdin_equals_file_input(llama_dir, txt_file, reference, tmp_path, monkeypatch):
    with open(txt_file, "rb") as f:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read())))
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, "-", out)) == 0
    assert_same_output(out, reference)


def test_float16_shards_and_normalize(llama_dir, txt_file, reference, tmp_path):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out, "--shard-dtype", "float16", "--normalize")) == 0
    embeddings, _ = load_embeddings(str(out))
    assert embeddings.dtype == np.float16
    expected = reference[0] / np.linalg.norm(reference[0], axis=1, keepdims=True)
    np.testing.assert_allclose(embeddings.astype(np.float32), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kill", ["shard:2:recorded", "shard:3:temp", "shard:3:unrecorded"],
                         ids=["at-boundary", "mid-write", "unrecorded"])
def test_resume_after_sigkill(llama_dir, txt_file, reference, tmp_path, kill):
    out = tmp_path / "out"
    args = encode_args(llama_dir, txt_file, out)
    killed = subprocess.run([sys.executable, "-m", "llm2vec_fast", *args], env=subprocess_env(**{FAULT_ENV: kill}),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not (out / MANIFEST).exists()
    progress = json.loads((out / "progress" / "rank0.json").read_text())
    assert [s["shard"] for s in progress["shards"]] == [0, 1]
    if kill.endswith("temp"):
        assert any(".tmp-" in name for name in os.listdir(out / "shards"))
    assert main(args) == 0
    assert not any(".tmp-" in name for name in os.listdir(out / "shards"))
    assert_same_output(out, reference)


def test_rerun_of_finished_output_does_nothing(llama_dir, txt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    before = (out / MANIFEST).stat().st_mtime_ns
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    assert "already complete" in capsys.readouterr().err
    assert (out / MANIFEST).stat().st_mtime_ns == before


def test_mismatched_arguments_are_refused(llama_dir, txt_file, texts, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    capsys.readouterr()
    assert main(encode_args(llama_dir, txt_file, out, "--pooling", "last_token")) == 1
    err = capsys.readouterr().err
    assert "pooling" in err and "--overwrite" in err and "Traceback" not in err
    other = tmp_path / "other.txt"
    other.write_text("\n".join(texts[:20]) + "\n")
    assert main(encode_args(llama_dir, str(other), out)) == 1
    assert "input" in capsys.readouterr().err
    assert main(encode_args(llama_dir, str(other), out, "--overwrite")) == 0
    assert load_embeddings(str(out))[0].shape[0] == 20
    np.testing.assert_array_equal(load_embeddings(str(out))[0], reference[0][:20])


BAD_JSONL = [
    (1, '{"text": "the cat sat"}'), (2, '{"text": "a red car"}'), (3, '{"text": "broken'),
    (4, '{"text": "sun and moon"}'), (5, '{"body": "no text field"}'), (6, '{"text": 42}'),
    (7, '{"text": "   "}'), (8, ""), (9, '{"text": "the river", "instruction": "q:"}'), (10, '{"text": "tea"}'),
]
BAD = {3: "invalid JSON", 5: "no 'text' field", 6: "is a number", 7: "whitespace-only", 8: "empty line"}


@pytest.fixture
def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for _, line in BAD_JSONL) + "\n\n")  # blank lines at EOF are not bad
    return str(path)


def test_bad_lines_stop_the_run_before_encoding(llama_dir, bad_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, bad_jsonl, out, "--shard-size", "4")) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"llm2vec-fast: error: {bad_jsonl}:3: invalid JSON")
    for line, reason in BAD.items():
        assert f"{bad_jsonl}:{line}: " in err and reason in err
    assert "--skip-bad-lines" in err and "Traceback" not in err
    assert not (out / "shards").exists() or not os.listdir(out / "shards")


def test_skip_bad_lines_skips_reports_and_records(llama_dir, model, bad_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, bad_jsonl, out, "--shard-size", "4", "--skip-bad-lines")) == 0
    err = capsys.readouterr().err
    assert "skipped 5 bad line(s) (lines 3, 5, 6, 7, 8)" in err
    embeddings, lines = load_embeddings(str(out))
    assert lines.tolist() == [1, 2, 4, 9, 10]
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["line"] for s in manifest["skipped"]] == sorted(BAD)
    assert all(reason in s["reason"] for s, reason in zip(manifest["skipped"], BAD.values()))
    assert sum(s["rows"] for s in manifest["shards"]) + len(manifest["skipped"]) == 10
    expected = model.encode(["the cat sat", "a red car", "sun and moon", ["q:", "the river"], "tea"],
                            show_progress_bar=False).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_bad_line_on_stdin_stops_at_its_shard(llama_dir, bad_jsonl, tmp_path, monkeypatch, capsys):
    with open(bad_jsonl, "rb") as f:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f.read())))
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, "-", out, "--format", "jsonl", "--shard-size", "2")) == 1
    assert "<stdin>:3: invalid JSON" in capsys.readouterr().err
    assert sorted(os.listdir(out / "shards")) == ["shard-000000.lines.npy", "shard-000000.npy"]


def test_user_errors_are_one_line(llama_dir, txt_file, tmp_path, capsys):
    cases = [
        (["--input", str(tmp_path / "missing.txt")], "does not exist"),
        (["--input", txt_file, "--model", str(tmp_path / "no-model")], "no-model"),
        (["--input", str(tmp_path)], "is a directory"),
        (["--input", txt_file, "--output", txt_file], "is a file"),
        (["--input", txt_file, "--output", os.path.join(txt_file, "sub")], "cannot write to --output"),
    ]
    for extra, message in cases:
        argv = ["encode", "--model", llama_dir, "--output", str(tmp_path / "out"), "--no-progress", *extra]
        assert main(argv) == 1, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "--input", txt_file, "--output", str(tmp_path / "o"), "--pooling", "max"])
    assert exit_info.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err


def test_help_explains_line_endings_and_the_line_limit(capsys):
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-line-bytes" in help_text and "\\n, \\r\\n or \\r" in help_text and "1 MiB" in help_text
    assert "a directory encode did not write is refused" in help_text


def test_output_dir_of_something_else_is_refused(llama_dir, txt_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(encode_args(llama_dir, txt_file, out)) == 1
    assert "not written by llm2vec-fast" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("start", ["fresh", "resume-single-process-run"])
def test_torchrun_two_processes_equal_one(llama_dir, txt_file, reference, tmp_path, start):
    out = tmp_path / "out"
    expected_rank1 = [1, 3]
    if start != "fresh":
        # The state a single-process run leaves when killed after two shards (see test_resume_after_sigkill):
        # the ranks of the new run must pick up where it stopped, whichever rank owns a finished shard.
        assert main(encode_args(llama_dir, txt_file, out)) == 0
        for name in ("manifest.json", "line_numbers.npy", *(f"shards/shard-00000{k}.npy" for k in (2, 3, 4))):
            os.remove(out / name)
        progress = json.loads((out / "progress" / "rank0.json").read_text())
        progress["shards"] = progress["shards"][:2]
        (out / "progress" / "rank0.json").write_text(json.dumps(progress))
        expected_rank1 = [3]
    # A loopback address and a free port: the default rendezvous resolves the host name, which a sandbox may lack.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "llm2vec_fast", *encode_args(llama_dir, txt_file, out)]
    result = subprocess.run(command, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(out / "progress")) == ["rank0.json", "rank1.json"]
    rank1 = json.loads((out / "progress" / "rank1.json").read_text())
    assert [s["shard"] for s in rank1["shards"]] == expected_rank1
    embeddings, lines = load_embeddings(str(out))
    np.testing.assert_array_equal(lines, reference[1])
    np.testing.assert_allclose(embeddings, reference[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- issue 11, item 8

def released_layout(llama_dir, tmp_path):
    """The released two-adapter layout on the tiny Llama: an MNTP directory (base config + tokenizer + adapter, no
    base weights) and a SimCSE adapter to put on top of it."""
    from test_encoder import make_adapter

    mntp = make_adapter(llama_dir, str(tmp_path / "mntp"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(llama_dir, name)) as src, open(os.path.join(mntp, name), "w") as dst:
            dst.write(src.read())
    return mntp, make_adapter(llama_dir, str(tmp_path / "simcse"), seed=1)


def test_peft_model_equals_the_api_and_a_changed_adapter_is_refused(llama_dir, texts, tmp_path, capsys):
    from test_encoder import make_adapter

    mntp, simcse = released_layout(llama_dir, tmp_path)
    path = tmp_path / "in.txt"
    path.write_text("\n".join(texts[:12]) + "\n")
    out = tmp_path / "out"
    assert main(encode_args(mntp, str(path), out, "--peft-model", simcse)) == 0
    embeddings, _ = load_embeddings(str(out))
    api = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, dtype=torch.float32)
    np.testing.assert_allclose(embeddings, api.encode(texts[:12], show_progress_bar=False).numpy(), atol=1e-5,
                               rtol=0)
    without = LLM2Vec.from_pretrained(mntp, dtype=torch.float32).encode(texts[:12], show_progress_bar=False)
    assert not np.allclose(embeddings, without.numpy(), atol=1e-3)  # the adapter was applied
    make_adapter(llama_dir, simcse, seed=2)  # the same adapter directory, retrained
    capsys.readouterr()
    assert main(encode_args(mntp, str(path), out, "--peft-model", simcse)) == 1
    err = capsys.readouterr().err
    assert "other arguments" in err and "peft_model_files: adapter_model.safetensors changed" in err, err


def test_output_to_stdout_is_refused_clearly(llama_dir, txt_file, capsys):
    assert main(["encode", "--model", llama_dir, "--input", txt_file, "--output", "-", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--output - (stdout) is not supported" in err and "load_embeddings" in err and err.count("\n") == 1


def test_a_run_that_failed_before_encoding_leaves_the_output_reusable(llama_dir, txt_file, reference, bad_jsonl,
                                                                      tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_bytes((Path(llama_dir) / "config.json").read_bytes())  # and no weights
    out = tmp_path / "out"
    assert main(encode_args(str(broken), txt_file, out)) == 1
    assert "cannot load --model" in capsys.readouterr().err
    assert (out / "fingerprint.json").exists()  # written before the model failed to load: it guards nothing
    assert main(encode_args(llama_dir, bad_jsonl, out)) == 1  # another model, bad lines: still no shard
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    assert_same_output(out, reference)
    assert main(encode_args(llama_dir, txt_file, out, "--pooling", "last_token")) == 1  # now it holds shards
    assert "other arguments" in capsys.readouterr().err


@pytest.fixture
def progress_bars_on():
    """--no-progress turns transformers' and huggingface_hub's bars off process-wide (earlier in-process runs here
    did): turn them on for the test, and again after it."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    enable_progress_bars()
    yield
    transformers_logging.enable_progress_bar()
    enable_progress_bars()


def is_bar(text: str) -> bool:
    return "it/s" in text or "%|" in text


def test_no_progress_silences_every_bar(llama_dir, txt_file, tmp_path, capsys, progress_bars_on):
    args = ["encode", "--model", llama_dir, "--input", txt_file, "--shard-size", str(SHARD)]
    assert main([*args, "--output", str(tmp_path / "shown")]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" in err and is_bar(err)  # the bars the option must silence, transformers' included
    assert main([*args, "--output", str(tmp_path / "silent"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not is_bar(err) and "Loading weights" not in err, err
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a cat\ta dog\t3.5\nsun\tmoon\t1\nthe sea\tthe ocean\t4\n")
    assert main(["eval", "similarity", "--model", llama_dir, "--data", str(pairs), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not is_bar(err) and "Loading weights" not in err, err


def subcommand_parsers():
    from llm2vec_fast.cli import build_parser

    def children(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    top = children(build_parser())
    return {"encode": top["encode"], **{f"eval {name}": p for name, p in children(top["eval"]).items()}}


@pytest.mark.parametrize("command", ["encode", "eval similarity", "eval probe"])
def test_help_shows_every_default_once(command):
    parser = subcommand_parsers()[command]
    help_text = " ".join(parser.format_help().split())
    assert "(default: smollm2-135m)" in help_text and "(default: float32)" in help_text  # --dtype float32
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False, "", [], argparse.SUPPRESS):
            continue
        entry = " ".join(parser._get_formatter()._expand_help(action).split()) if action.help else ""
        assert entry.count("default") == 1, (action.option_strings, entry)  # said once: in words, or the value
        if "(default: " not in entry or "default: the" in entry:
            continue
        assert f"(default: {action.default}" in entry, (action.option_strings, entry)
    if command == "encode":
        for value in ("text", "instruction", "10000", "1048576"):
            assert f"(default: {value}" in help_text


@pytest.mark.parametrize("option, value", [("--dtype", "float64"), ("--shard-dtype", "bfloat16"),
                                           ("--format", "csv"), ("--pooling", "max")])
def test_choices_are_validated(txt_file, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "--input", txt_file, "--output", str(tmp_path / "o"), option, value])
    assert exit_info.value.code == 2 and f"argument {option}: invalid choice: '{value}'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- issue 21, item 4

def test_a_resume_stating_the_defaults_is_the_same_run(llama_dir, txt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    stored = json.loads((out / "fingerprint.json").read_text())
    assert (stored["pooling"], stored["max_length"]) == ("mean", 512)  # resolved before the fingerprint
    capsys.readouterr()
    assert main(encode_args(llama_dir, txt_file, out, "--pooling", "mean", "--max-length", "512")) == 0
    assert "already complete" in capsys.readouterr().err
    # Outputs of earlier versions recorded the unset defaults as null: they still resume.
    (out / "fingerprint.json").write_text(json.dumps(dict(stored, pooling=None, max_length=None)))
    assert main(encode_args(llama_dir, txt_file, out)) == 0
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["encode", "eval similarity", "eval probe"])
def test_help_gives_the_real_default_token_budgets(command):
    from llm2vec_fast.precision import DEFAULT_MAX_BATCH_TOKENS

    help_text = " ".join(subcommand_parsers()[command].format_help().split())
    budgets = help_text[help_text.index("tokens per batch"):]
    for key in ("cpu", "cpu-bf16", "cuda"):
        assert str(DEFAULT_MAX_BATCH_TOKENS[key]) in budgets[:200], budgets[:200]
