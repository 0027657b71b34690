"""Training configs: the llm2vec reference's train_configs as they ship, our own keys, and `train --help`.

The three REF_* literals are the reference's files verbatim (llm2vec 0.2.3, train_configs/mntp/MetaLlama3.json,
train_configs/mntp/Mistral.json, train_configs/simcse/MetaLlama3.json, train_configs/supervised/MetaLlama3.json).
"""

import json
import warnings

import pytest

from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.train.config import ConfigWarning, TrainConfig
from tiny_models import corpus

REF_MNTP_LLAMA3 = """{
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
    "dataset_name": "wikitext",
    "dataset_config_name": "wikitext-103-raw-v1",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "do_train": true,
    "do_eval": true,
    "max_seq_length": 512,
    "mask_token_type": "blank",
    "data_collator_type": "default",
    "mlm_probability": 0.2,
    "overwrite_output_dir": true,
    "output_dir": "output/mlm/Meta-Llama-3-8B-Instruct",
    "evaluation_strategy": "steps",
    "eval_steps": 100,
    "save_steps": 200,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": true,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2"
}"""

REF_MNTP_MISTRAL = """{
    "model_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
    "dataset_name": "wikitext",
    "dataset_config_name": "wikitext-103-raw-v1",
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 32,
    "gradient_accumulation_steps": 1,
    "do_train": true,
    "do_eval": true,
    "max_seq_length": 512,
    "mask_token_type": "blank",
    "data_collator_type": "all_mask",
    "mlm_probability": 0.8,
    "overwrite_output_dir": true,
    "output_dir": "output/mlm/Mistral-7B-Instruct-v0.2",
    "evaluation_strategy": "steps",
    "eval_steps": 100,
    "save_steps": 200,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": true,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2"
}"""

REF_SIMCSE_LLAMA3 = """{
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
    "peft_model_name_or_path": "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
    "simcse_dropout": 0.3,
    "bidirectional": true,
    "pooling_mode": "mean",
    "dataset_name": "Wiki1M",
    "dataset_file_path": "cache/wiki1m_for_simcse.txt",
    "remove_unused_columns": false,
    "learning_rate": 3e-5,
    "loss_scale": 20,
    "per_device_train_batch_size": 128,
    "gradient_accumulation_steps": 1,
    "do_train": true,
    "disable_tqdm": false,
    "max_seq_length": 128,
    "overwrite_output_dir": true,
    "output_dir": "output/simcse/Meta-Llama-3-8B-Instruct",
    "logging_steps": 50,
    "save_steps": 200,
    "save_only_model": true,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": true,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
    "seed": 42
}"""

REF_SUPERVISED_LLAMA3 = """{
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
    "peft_model_name_or_path": "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
    "bidirectional": true,
    "pooling_mode": "mean",
    "dataset_name": "E5",
    "dataset_file_path": "cache/E5-data",
    "remove_unused_columns": false,
    "learning_rate": 2e-4,
    "num_train_epochs": 3,
    "warmup_steps": 300,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 64,
    "gradient_accumulation_steps": 1,
    "do_train": true,
    "disable_tqdm": false,
    "max_seq_length": 512,
    "overwrite_output_dir": true,
    "output_dir": "output/supervised/Meta-Llama-3-8B-Instruct",
    "logging_steps": 50,
    "save_steps": 200,
    "save_only_model": true,
    "stop_after_n_steps": 1000,
    "lora_r": 16,
    "gradient_checkpointing": true,
    "torch_dtype": "bfloat16",
    "attn_implementation": "flash_attention_2",
    "seed": 42
}"""


def write(tmp_path, text, name="config.json") -> str:
    path = tmp_path / name
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    return str(path)


def load(stage, path, **overrides):
    """(config, [warning messages])."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = TrainConfig.for_stage(stage, path, **overrides)
    assert all(w.category is ConfigWarning for w in caught)
    return config, [str(w.message) for w in caught]


def edited(config, **changes) -> dict:
    """`config` (JSON text or a dict) with `changes`; a change to ... removes the key."""
    values = json.loads(config) if isinstance(config, str) else dict(config)
    values.update(changes)
    return {k: v for k, v in values.items() if v is not ...}


def test_reference_mntp_config_maps_onto_the_recipe(tmp_path):
    config, messages = load("mntp", write(tmp_path, REF_MNTP_LLAMA3), data="wiki.txt")
    assert (config.model, config.output, config.data) == ("meta-llama/Meta-Llama-3-8B-Instruct",
                                                          "output/mlm/Meta-Llama-3-8B-Instruct", "wiki.txt")
    assert (config.batch_size, config.block_size, config.steps, config.save_steps) == (32, 512, 1000, 200)
    assert (config.mlm_probability, config.mask_replace_prob, config.random_replace_prob) == (0.2, 0.8, 0.1)
    assert (config.mask_token, config.dtype, config.gradient_checkpointing) == ("", "bfloat16", True)
    assert (config.lora_r, config.lora_alpha, config.learning_rate) == (16, 32, 5e-5)
    text = "\n".join(messages)
    assert "per_device_eval_batch_size, do_eval, evaluation_strategy, eval_steps have no effect" in text
    assert "llm2vec-fast eval" in text
    assert "overwrite_output_dir has no effect" in text and "--overwrite" in text and "--resume" in text
    assert "attn_implementation has no effect" in text
    assert "decays the learning rate linearly over 3 epochs" in text and "stop_after_n_steps=1000" in text
    assert "do_train" not in text and "gradient_accumulation_steps" not in text  # honoured: what we do anyway


def test_reference_mistral_all_mask_collator(tmp_path):
    config, _ = load("mntp", write(tmp_path, REF_MNTP_MISTRAL), data="wiki.txt")
    assert (config.mlm_probability, config.mask_replace_prob, config.random_replace_prob) == (0.8, 1.0, 0.0)
    assert config.model == "mistralai/Mistral-7B-Instruct-v0.2"


def test_a_hub_dataset_needs_a_data_file(tmp_path):
    path = write(tmp_path, REF_MNTP_LLAMA3)
    with pytest.raises(ValueError, match=r"dataset_name='wikitext' \(dataset_config_name='wikitext-103-raw-v1'\): "
                                         r"the reference downloads it .* never downloads data: .*pass --data FILE"):
        TrainConfig.for_stage("mntp", path)
    with pytest.raises(ValueError, match=r"data='mine.txt' and dataset_name='wikitext' both name the training data"):
        TrainConfig.for_stage("mntp", write(tmp_path, edited(REF_MNTP_LLAMA3, data="mine.txt")))


def test_mntp_train_file_is_the_data_with_the_holdout_named(tmp_path):
    values = edited(REF_MNTP_LLAMA3, dataset_name=..., dataset_config_name=..., train_file="wiki.txt")
    config, messages = load("mntp", write(tmp_path, values))
    assert config.data == "wiki.txt"
    assert any("less its first 5% (validation_split_percentage" in m for m in messages)


def test_reference_simcse_config(tmp_path):
    config, messages = load("simcse", write(tmp_path, REF_SIMCSE_LLAMA3))
    assert config.peft_model == "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
    assert config.data == "cache/wiki1m_for_simcse.txt"
    assert (config.attention_dropout, config.scale, config.pooling_mode) == (0.3, 20.0, "mean")
    assert (config.batch_size, config.max_length, config.learning_rate, config.seed) == (128, 128, 3e-5, 42)
    assert (config.steps, config.save_steps, config.lora_alpha) == (1000, 200, 32)
    text = "\n".join(messages)
    assert "logging_steps" in text and "disable_tqdm" in text and "train_log.jsonl" in text
    assert "save_only_model has no effect" in text and "remove_unused_columns has no effect" in text


def test_reference_supervised_config_needs_jsonl_data(tmp_path):
    path = write(tmp_path, REF_SUPERVISED_LLAMA3)
    with pytest.raises(ValueError, match=r"dataset_file_path='cache/E5-data': the reference's E5 directory .* "
                                         r"pass --data FILE.jsonl"):
        TrainConfig.for_stage("supervised", path)
    config, messages = load("supervised", path, data="e5.jsonl")
    assert (config.data, config.learning_rate, config.warmup_steps, config.batch_size) == ("e5.jsonl", 2e-4, 300, 64)
    assert (config.max_length, config.scale, config.steps) == (512, 50.0, 1000)
    assert any("over 3 epochs (num_train_epochs)" in m for m in messages)


def test_unknown_keys_are_named(tmp_path):
    path = write(tmp_path, edited(REF_SIMCSE_LLAMA3, lora_rank=8, learning_rat=1e-4))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rat', 'lora_rank'\]: neither a "
                                         r"TrainConfig option nor a key of the llm2vec reference's train_configs"):
        TrainConfig.for_stage("simcse", path)


def test_another_stages_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['dataset_config_name', 'mask_token_type', 'data_collator_type'\] are "
                                         r"keys of the reference's mntp configs, not of simcse"):
        TrainConfig.for_stage("simcse", write(tmp_path, REF_MNTP_LLAMA3), data="x.txt")
    with pytest.raises(ValueError, match=r"\['peft_model_name_or_path', .*'simcse_dropout'.*\] are keys of the "
                                         r"reference's simcse and supervised configs, not of mntp"):
        TrainConfig.for_stage("mntp", write(tmp_path, REF_SIMCSE_LLAMA3))
    with pytest.raises(ValueError, match=r"block_size=64 \(--block-size\) is an option of mntp training; simcse "
                                         r"does not use it"):
        TrainConfig.for_stage("simcse", data="x.txt", output="out", block_size=64)


def test_one_option_given_in_both_forms(tmp_path):
    same = edited(REF_SIMCSE_LLAMA3, batch_size=128, scale=20.0, steps=1000)
    assert load("simcse", write(tmp_path, same))[0].batch_size == 128
    for ours, value, theirs in (("batch_size", 64, "per_device_train_batch_size"), ("scale", 50.0, "loss_scale"),
                                ("steps", 10, "stop_after_n_steps"), ("attention_dropout", 0.1, "simcse_dropout")):
        path = write(tmp_path, edited(REF_SIMCSE_LLAMA3, **{ours: value}))
        with pytest.raises(ValueError, match=rf"both set {ours}; keep one of them") as error:
            TrainConfig.for_stage("simcse", path)
        assert theirs in str(error.value) and ours in str(error.value)


@pytest.mark.parametrize("key, value, fix", [
    ("gradient_accumulation_steps", 4, "raise per_device_train_batch_size (--batch-size)"),
    ("bidirectional", False, "bidirectional LLM2Vec model only"),
    ("torch_dtype", "auto", "name the dtype"),
    ("lr_scheduler_type", "cosine", "other schedules are not implemented"),
    ("warmup_ratio", 0.1, "warmup_steps (--warmup-steps)"),
    ("bf16", True, "set torch_dtype"),
    ("loss_class", "MultipleNegativesRankingLoss", "other losses are not implemented"),
    ("resume_from_checkpoint", "output/checkpoint-200", "pass --resume on the command line"),
    ("do_train", False, "always trains"),
])
def test_behaviour_we_do_not_implement_is_an_error_naming_the_alternative(tmp_path, key, value, fix):
    with pytest.raises(ValueError, match=rf"{key}={value!r}: .*") as error:
        TrainConfig.for_stage("simcse", write(tmp_path, edited(REF_SIMCSE_LLAMA3, **{key: value})))
    assert fix in str(error.value)


@pytest.mark.parametrize("key, value, fix", [
    ("mask_token_type", "eos", "mask_token=<that token"),
    ("mask_token_type", "mask", "adding a new mask token"),
    ("data_collator_type", "whole_word", "expected 'default'"),
    ("line_by_line", True, "one sequence per line is not implemented"),
])
def test_mntp_keys_we_do_not_implement(tmp_path, key, value, fix):
    with pytest.raises(ValueError, match=rf"{key}={value!r}: .*{fix}"):
        TrainConfig.for_stage("mntp", write(tmp_path, edited(REF_MNTP_LLAMA3, **{key: value})), data="x.txt")


def test_training_length_keys(tmp_path):
    epochs_only = edited(REF_SUPERVISED_LLAMA3, stop_after_n_steps=...)
    with pytest.raises(ValueError, match="num_train_epochs: llm2vec-fast trains a number of steps, not epochs"):
        TrainConfig.for_stage("supervised", write(tmp_path, epochs_only), data="e5.jsonl")
    config, messages = load("supervised", write(tmp_path, edited(epochs_only, max_steps=500)), data="e5.jsonl")
    assert config.steps == 500
    assert any("num_train_epochs has no effect" in m for m in messages)
    assert not any("decays the learning rate" in m for m in messages)  # max_steps sizes the schedule, as ours
    config, _ = load("supervised", write(tmp_path, edited(REF_SUPERVISED_LLAMA3, max_steps=300)), data="e5.jsonl")
    assert config.steps == 300  # the Trainer stops at whichever comes first


def test_lora_alpha_follows_lora_r(tmp_path):
    config, _ = load("simcse", write(tmp_path, edited(REF_SIMCSE_LLAMA3, lora_r=8)))
    assert (config.lora_r, config.lora_alpha) == (8, 16)  # the reference's scripts: alpha = 2 x r
    config, _ = load("simcse", write(tmp_path, edited(REF_SIMCSE_LLAMA3, lora_r=8, lora_alpha=8)))
    assert config.lora_alpha == 8


def test_wrong_types_and_nulls_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"per_device_train_batch_size='32': expected int for batch_size"):
        TrainConfig.for_stage("simcse", write(tmp_path, edited(REF_SIMCSE_LLAMA3, per_device_train_batch_size="32")))
    with pytest.raises(ValueError, match=r"\['torch_dtype'\] set to null"):
        TrainConfig.for_stage("simcse", write(tmp_path, edited(REF_SIMCSE_LLAMA3, torch_dtype=None)))


def test_a_stored_run_config_is_a_config_file(tmp_path):
    first = TrainConfig.for_stage("simcse", data="x.txt", output="out", max_length=64, lora_r=8)
    again, messages = load("simcse", write(tmp_path, first.to_dict()))
    assert again == first and messages == []


def test_cli_trains_from_a_reference_config(llama_dir, tmp_path, capsys):
    data = tmp_path / "wiki.txt"
    data.write_text("\n".join(corpus(60, seed=5)) + "\n")
    small = edited(REF_MNTP_LLAMA3, model_name_or_path=llama_dir, output_dir=str(tmp_path / "out"),
                   per_device_train_batch_size=2, max_seq_length=32, stop_after_n_steps=2, save_steps=10,
                   gradient_checkpointing=False, torch_dtype="float32")
    status = cli_main(["train", "mntp", "--config", write(tmp_path, small), "--data", str(data), "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "mntp: 2 steps" in captured.out
    warned = [line for line in captured.err.splitlines() if line.startswith("llm2vec-fast train: warning: ")]
    assert len(warned) == 4 and any("do_eval" in line for line in warned)
    with open(tmp_path / "out" / "train_config.json") as f:
        saved = json.load(f)
    assert (saved["block_size"], saved["batch_size"], saved["data"]) == (32, 2, str(data))

    with_hub_data = cli_main(["train", "mntp", "--config", write(tmp_path, small, "hub.json"), "--output",
                              str(tmp_path / "other")])
    assert with_hub_data == 1 and "pass --data FILE" in capsys.readouterr().err


def test_help_shows_the_defaults_per_stage(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: mntp 32, simcse 128, supervised 64" in text
    assert "(mntp only; default: 512)" in text and "(simcse/supervised only; default: simcse 128, supervised 512)" \
        in text
    assert "{float32,bfloat16,float16}" in text and "(default: bfloat16)" in text
    assert "reference's training configs" in text


def test_dtype_choices_are_validated(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["train", "mntp", "--data", "x.txt", "--output", "out", "--dtype", "bf16"])
    assert exit_.value.code == 2
    assert "invalid choice: 'bf16'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- issue 23, item 5

def _train_simcse(llama_dir, tmp_path, output, *extra):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(corpus(12, seed=3)) + "\n")
    return cli_main(["train", "simcse", "--model", llama_dir, "--data", str(data), "--output", str(tmp_path / output),
                     "--steps", "1", "--batch-size", "4", "--dtype", "float32", "--no-gradient-checkpointing",
                     "--max-length", "32", "--no-progress", *extra])


def test_max_length_limits_training_not_the_trained_model(llama_dir, tmp_path, capsys):
    """--max-length 32 cuts the training texts and is recorded in the run's train_config.json, but the adapter's
    llm2vec_config.json (the defaults every later encode loads) does not inherit it; --save-max-length asks."""
    assert _train_simcse(llama_dir, tmp_path, "plain") == 0, capsys.readouterr().err
    inference = json.loads((tmp_path / "plain" / "llm2vec_config.json").read_text())
    assert "max_length" not in inference and inference["pooling_mode"] == "mean"
    assert json.loads((tmp_path / "plain" / "train_config.json").read_text())["max_length"] == 32

    from llm2vec_fast import LLM2Vec

    trained = LLM2Vec.from_pretrained(llama_dir, peft_model_name_or_path=str(tmp_path / "plain"))
    assert trained.max_length == 512  # the loader's default

    assert _train_simcse(llama_dir, tmp_path, "saved", "--save-max-length") == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())["max_length"] == 32


def test_save_max_length_keeps_everything_else(tmp_path):
    from llm2vec_fast.train.output import save_max_length

    path = tmp_path / "llm2vec_config.json"
    stored = {"pooling_mode": "mean", "doc_max_length": 400, "skip_instruction": True}
    path.write_text(json.dumps(stored))
    save_max_length(str(tmp_path), 32)
    assert json.loads(path.read_text()) == {**stored, "max_length": 32}
