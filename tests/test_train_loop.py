"""The shared training loop: exact resume, the saved layout reloading in LLM2Vec, the CLI, and DDP (gloo)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.errors import UserError
from llm2vec_fast.train.config import TrainConfig
from llm2vec_fast.train.loop import seed_dropout_per_rank, train
from llm2vec_fast.train.mntp import MNTPStage
from llm2vec_fast.train.simcse import SimCSEStage
from test_dropin import PEFT_0_12_LORA_FIELDS
from tiny_models import corpus


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(corpus(300, seed=11)) + "\n")
    return str(path)


def config(stage, model, data, output, **kw):
    values = dict(model=model, data=data, output=str(output), dtype="float32", steps=10, save_steps=5,
                  learning_rate=1e-3, gradient_checkpointing=False)
    values.update(kw)
    return TrainConfig.for_stage(stage, **values)


class Killed(Exception):
    pass


def kill_at(stage, step_to_die):
    original = stage.step

    def step(step):
        if step == step_to_die:
            raise Killed
        return original(step)

    stage.step = step
    return stage


@pytest.mark.parametrize("stage_name", ["mntp", "simcse"])
def test_resume_continues_identically(llama_dir, text_file, tmp_path, stage_name):
    make = MNTPStage if stage_name == "mntp" else SimCSEStage
    extra = dict(batch_size=4, block_size=48) if stage_name == "mntp" else dict(batch_size=6, gradient_checkpointing=True)
    whole = config(stage_name, llama_dir, text_file, tmp_path / "whole", **extra)
    uninterrupted = train(make(whole), whole, show_progress=False)

    killed = config(stage_name, llama_dir, text_file, tmp_path / "killed", **extra)
    with pytest.raises(Killed):
        train(kill_at(make(killed), 7), killed, show_progress=False)
    assert os.path.isdir(tmp_path / "killed" / "checkpoints" / "step-5")
    resumed = train(make(killed), killed, resume=True, show_progress=False)
    assert resumed == uninterrupted[5:]  # bitwise: same data, same masks, same optimizer state
    with open(tmp_path / "killed" / "train_log.jsonl") as f:
        assert [json.loads(line)["loss"] for line in f] == uninterrupted
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_options(llama_dir, text_file, tmp_path):
    first = config("mntp", llama_dir, text_file, tmp_path / "run", batch_size=2, block_size=32, steps=5)
    train(MNTPStage(first), first, show_progress=False)
    changed = config("mntp", llama_dir, text_file, tmp_path / "run", batch_size=2, block_size=32, steps=5,
                     learning_rate=0.5)
    with pytest.raises(UserError, match=r"option\(s\) \['learning_rate'\] differ"):
        train(MNTPStage(changed), changed, resume=True, show_progress=False)


def test_recipe_outputs_load_in_llm2vec(llama_dir, text_file, tmp_path):
    mntp = config("mntp", llama_dir, text_file, tmp_path / "mntp", batch_size=4, block_size=48, steps=3)
    train(MNTPStage(mntp), mntp, show_progress=False)
    files = set(os.listdir(tmp_path / "mntp"))
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "llm2vec_config.json",
            "tokenizer.json"} <= files
    assert not {"model.safetensors", "pytorch_model.bin"} & files  # the released layout: no base weights
    base = LLM2Vec.from_pretrained(llama_dir).encode(["the cat sat"], show_progress_bar=False)
    after_mntp = LLM2Vec.from_pretrained(str(tmp_path / "mntp")).encode(["the cat sat"], show_progress_bar=False)
    assert (after_mntp - base).abs().max() > 1e-4

    simcse = config("simcse", str(tmp_path / "mntp"), text_file, tmp_path / "simcse", batch_size=6, steps=3)
    train(SimCSEStage(simcse), simcse, show_progress=False)
    encoder = LLM2Vec.from_pretrained(str(tmp_path / "mntp"), peft_model_name_or_path=str(tmp_path / "simcse"))
    after_simcse = encoder.encode(["the cat sat"], show_progress_bar=False)
    assert (after_simcse - after_mntp).abs().max() > 1e-4
    # Both outputs are written in the files llm2vec 0.2.3 (peft 0.12, transformers 4.44) loads too.
    for stage in ("mntp", "simcse"):
        with open(tmp_path / stage / "adapter_config.json") as f:
            assert set(json.load(f)) <= PEFT_0_12_LORA_FIELDS
        with open(tmp_path / stage / "tokenizer_config.json") as f:
            assert json.load(f)["tokenizer_class"] != "TokenizersBackend"


def test_train_cli(llama_dir, text_file, tmp_path, capsys):
    config_file = tmp_path / "mntp.json"
    config_file.write_text(json.dumps(dict(block_size=32, batch_size=2, dtype="float32", save_steps=2)))
    status = cli_main(["train", "mntp", "--config", str(config_file), "--model", llama_dir, "--data", text_file,
                       "--output", str(tmp_path / "out"), "--steps", "4", "--no-progress"])
    assert status == 0
    assert "mntp: 4 steps" in capsys.readouterr().out
    with open(tmp_path / "out" / "train_log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    with open(tmp_path / "out" / "train_config.json") as f:
        saved = json.load(f)
    assert saved["block_size"] == 32 and saved["steps"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"block_sise": 3}))
    assert cli_main(["train", "mntp", "--config", str(bad), "--data", text_file, "--output", str(tmp_path / "x")]) == 1
    assert "unknown option(s) ['block_sise']" in capsys.readouterr().err


def test_ablation_benchmark_reruns_into_its_own_outputs(llama_dir, text_file, tmp_path):
    """benchmarks/reproduce_ablation.py trains into fixed folders: a rerun retrains there (training alone refuses
    a used output), and --reuse keeps a run of the same settings instead."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "reproduce_ablation", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "reproduce_ablation.py"))
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    args = argparse.Namespace(dtype="float32")
    sizes = dict(model=llama_dir, data=text_file, output=str(tmp_path / "mntp"), steps=2, batch_size=2, block_size=32,
                 learning_rate=1e-3)
    first = ablation.train_stage("mntp", args, **sizes)
    again = ablation.train_stage("mntp", args, **sizes)
    assert again["last_loss"] == first["last_loss"] and "reused" not in again
    assert ablation.train_stage("mntp", args, reuse=True, **sizes)["reused"]
    changed = ablation.train_stage("mntp", args, reuse=True, **{**sizes, "steps": 3})
    assert changed["steps"] == 3 and "reused" not in changed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(llama_dir, text_file, tmp_path):
    """torchrun, gloo, 2 ranks x 4 examples == 1 process x 8 examples: same losses, same adapter."""
    settings = tmp_path / "simcse.json"
    settings.write_text(json.dumps(dict(attention_dropout=0.0, lora_dropout=0.0, dtype="float32", steps=3,
                                        learning_rate=1e-3, gradient_checkpointing=False, save_steps=100)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    common = ["-m", "llm2vec_fast", "train", "simcse", "--config", str(settings), "--model", llama_dir,
              "--data", text_file, "--no-progress"]
    single = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one"), "--batch-size", "8"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                             "127.0.0.1", "--master_port", str(free_port()), *common,
                             "--output", str(tmp_path / "two"), "--batch-size", "4"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    logs = []
    for run in ("one", "two"):
        with open(tmp_path / run / "train_log.jsonl") as f:
            logs.append([json.loads(line)["loss"] for line in f])
    assert len(logs[0]) == 3
    torch.testing.assert_close(torch.tensor(logs[1]), torch.tensor(logs[0]), atol=1e-5, rtol=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)


def test_each_rank_draws_its_own_dropout_masks():
    """Ranks seed alike (identical LoRA init), then each gets its own dropout stream; one process is untouched."""
    with torch.random.fork_rng():
        draws = []
        for rank in (0, 1):
            seed_dropout_per_rank(seed=42, start=0, rank=rank, world=2)
            draws.append(torch.rand(16))
        assert not torch.equal(draws[0], draws[1])
        seed_dropout_per_rank(seed=42, start=0, rank=1, world=2)
        assert torch.equal(torch.rand(16), draws[1])  # reproducible
        seed_dropout_per_rank(seed=42, start=5, rank=1, world=2)
        assert not torch.equal(torch.rand(16), draws[1])  # a resumed run continues on a fresh stream
        state = torch.get_rng_state()
        seed_dropout_per_rank(seed=42, start=0, rank=0, world=1)
        assert torch.equal(torch.get_rng_state(), state)
