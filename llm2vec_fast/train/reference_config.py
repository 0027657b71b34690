"""The llm2vec reference's training configs as TrainConfig values: reading a config file and translating its keys.

A config file (JSON, or YAML when PyYAML is installed) holds any subset of the TrainConfig fields, or the keys of
the llm2vec 0.2.3 reference's training configs (its train_configs/{mntp,simcse,supervised}/*.json, read there by
HfArgumentParser: model_name_or_path, per_device_train_batch_size, ...), or both. `REFERENCE_KEYS` says what
becomes of each reference key: it sets a TrainConfig field; or it is accepted because its value is what
llm2vec-fast does anyway; or it has no effect here (evaluation, logging, data-loader workers), which a
ConfigWarning names; or its value asks for behaviour llm2vec-fast does not implement, which is an error naming the
key and the alternative. Unknown keys, a key of another stage, and two keys that set one option to different values
are errors, so nothing in a file is silently dropped. A file that cannot be read as a mapping of names to values
(a syntax error, nesting too deep, not UTF-8, a YAML tag such as !!python/object that would build an object: YAML
is read with yaml.safe_load, which never builds one) is a ValueError naming the file, and the line where the
parser gives one.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from .config import CONTRASTIVE, DTYPES, FIELDS, STAGES, ConfigWarning, checked_value


class _Refused(ValueError):
    """A reference key whose value asks for behaviour llm2vec-fast does not implement (the message: why, and the
    alternative)."""


@dataclass(frozen=True)
class _Key:
    """What becomes of one key of the reference's configs.

    stages: the stages whose reference script reads the key. Then exactly one of: `to`, the field it sets (the
    value unchanged) or a function (value, stage) -> {field: value} that raises _Refused; `accepts`, the values
    that are what llm2vec-fast does anyway, any other being refused with `refused` (why, and the alternative);
    `no_effect`, why it changes nothing here (a ConfigWarning); `group`, read together with related keys by
    _Translation.
    """

    stages: tuple[str, ...] = STAGES
    to: str | Callable | None = None
    accepts: tuple = ()
    refused: str = ""
    no_effect: str = ""
    group: bool = False


_NO_EVAL = "nothing is evaluated during training (score the adapter afterwards with `llm2vec-fast eval`)"
_LOGGING = "every step is logged to train_log.jsonl in the output directory (--no-progress hides the progress bar)"
_OUTPUT = ("a run already in the output directory is never replaced or continued on a config file's word: pass "
           "--overwrite (replace it) or --resume (continue it) on the command line")
_LOADER = "the data is read and tokenized once before training; there is no data loader or cache to tune"
_CHECKPOINTS = "every checkpoint is kept, with its optimizer state, so that --resume continues exactly"
_ATTENTION = ("training always runs llm2vec-fast's own attention kernels; the key chose the reference's "
              "implementation of the same attention")
_ADAMW = "the optimizer is torch AdamW with betas (0.9, 0.999) and eps 1e-8; other settings are not implemented"
_AMP = ("there is no mixed-precision autocast: the weights train in torch_dtype (--dtype); remove the key and set "
        "torch_dtype")


def _max_seq_length(value, stage: str) -> dict:
    # MNTP cuts the concatenated text into blocks of this length; the contrastive stages truncate each text to it.
    return {"block_size" if stage == "mntp" else "max_length": value}


def _torch_dtype(value, stage: str) -> dict:
    if value == "auto":
        raise _Refused(f"name the dtype: one of {', '.join(DTYPES)}")
    return {"dtype": value}


def _mask_token_type(value, stage: str) -> dict:
    if value == "blank":
        return {"mask_token": ""}  # "": the tokenizer's mask token, else "_" -- the reference's "blank"
    if value == "eos":
        raise _Refused("name the tokenizer's end-of-sequence token itself: mask_token=<that token, e.g. '</s>'>")
    raise _Refused("adding a new mask token (and resizing the embeddings) is not implemented; use 'blank', or "
                   "mask_token=<a token of the vocabulary>")


def _data_collator_type(value, stage: str) -> dict:
    # The reference's collators: the BERT split of the selected tokens, or every selected token masked.
    split = {"default": (0.8, 0.1), "all_mask": (1.0, 0.0)}
    if value not in split:
        raise _Refused("expected 'default' (80% mask / 10% random / 10% kept) or 'all_mask' (100% mask); or set "
                       "mask_replace_prob and random_replace_prob")
    return dict(zip(("mask_replace_prob", "random_replace_prob"), split[value]))


REFERENCE_KEYS = {
    # what the model, data and output are
    "model_name_or_path": _Key(to="model"),
    "peft_model_name_or_path": _Key(CONTRASTIVE, to="peft_model"),
    "output_dir": _Key(to="output"),
    "dataset_name": _Key(group=True),
    "dataset_config_name": _Key(("mntp",), group=True),
    "dataset_file_path": _Key(CONTRASTIVE, group=True),
    "train_file": _Key(("mntp",), group=True),
    "validation_split_percentage": _Key(("mntp",), group=True),
    "validation_file": _Key(("mntp",), no_effect=_NO_EVAL),
    # how long and how fast
    "stop_after_n_steps": _Key(group=True),
    "max_steps": _Key(group=True),
    "num_train_epochs": _Key(group=True),
    "per_device_train_batch_size": _Key(to="batch_size"),
    "gradient_accumulation_steps": _Key(accepts=(1,), refused="gradients are not accumulated; raise "
                                        "per_device_train_batch_size (--batch-size) instead, and for a contrastive "
                                        "stage bound its memory with gradcache_chunk (--gradcache-chunk)"),
    "lr_scheduler_type": _Key(accepts=("linear",), refused="the learning rate warms up and decays linearly; other "
                              "schedules are not implemented"),
    "warmup_ratio": _Key(accepts=(0.0,), refused="give the warmup as warmup_steps (--warmup-steps)"),
    "optim": _Key(accepts=("adamw_torch", "adamw_torch_fused", "adamw_hf"), refused=_ADAMW),
    "adam_beta1": _Key(accepts=(0.9,), refused=_ADAMW),
    "adam_beta2": _Key(accepts=(0.999,), refused=_ADAMW),
    "adam_epsilon": _Key(accepts=(1e-8,), refused=_ADAMW),
    "fp16": _Key(accepts=(False,), refused=_AMP),
    "bf16": _Key(accepts=(False,), refused=_AMP),
    "torch_dtype": _Key(to=_torch_dtype),
    "max_seq_length": _Key(to=_max_seq_length),
    # the model
    "bidirectional": _Key(CONTRASTIVE, accepts=(True,), refused="llm2vec-fast trains the bidirectional LLM2Vec "
                          "model only; remove the key"),
    "attn_implementation": _Key(no_effect=_ATTENTION),
    "simcse_dropout": _Key(("simcse",), to="attention_dropout"),
    "loss_scale": _Key(CONTRASTIVE, to="scale"),
    "loss_class": _Key(CONTRASTIVE, accepts=("HardNegativeNLLLoss",), refused="the loss is HardNegativeNLLLoss "
                       "(in-batch InfoNCE with hard negatives); other losses are not implemented"),
    "mask_token_type": _Key(("mntp",), to=_mask_token_type),
    "data_collator_type": _Key(("mntp",), to=_data_collator_type),
    "line_by_line": _Key(("mntp",), accepts=(False,), refused="MNTP concatenates the texts and cuts them into "
                         "blocks of max_seq_length tokens; one sequence per line is not implemented"),
    "tokenizer_name": _Key(("mntp",), refused="the tokenizer is read from model_name_or_path's directory; put it "
                           "there"),
    "config_name": _Key(("mntp",), refused="the model config is read from model_name_or_path's directory; put it "
                        "there"),
    "max_train_samples": _Key(("mntp",), refused="cut the data file to the examples to train on instead"),
    "do_train": _Key(accepts=(True,), refused="`llm2vec-fast train` always trains; remove the key"),
    "resume_from_checkpoint": _Key(refused="pass --resume on the command line: it continues from the newest intact "
                                   "checkpoint in the output directory"),
    "save_strategy": _Key(accepts=("steps",), refused="a checkpoint is written every save_steps steps; set "
                          "save_steps (--save-steps)"),
    # no effect here
    "do_eval": _Key(no_effect=_NO_EVAL),
    "do_predict": _Key(no_effect=_NO_EVAL),
    "evaluation_strategy": _Key(no_effect=_NO_EVAL),
    "eval_strategy": _Key(no_effect=_NO_EVAL),
    "eval_steps": _Key(no_effect=_NO_EVAL),
    "per_device_eval_batch_size": _Key(no_effect=_NO_EVAL),
    "max_eval_samples": _Key(("mntp",), no_effect=_NO_EVAL),
    "logging_steps": _Key(no_effect=_LOGGING),
    "logging_strategy": _Key(no_effect=_LOGGING),
    "logging_first_step": _Key(no_effect=_LOGGING),
    "logging_dir": _Key(no_effect=_LOGGING),
    "report_to": _Key(no_effect=_LOGGING),
    "run_name": _Key(no_effect=_LOGGING),
    "disable_tqdm": _Key(no_effect=_LOGGING),
    "overwrite_output_dir": _Key(no_effect=_OUTPUT),
    "save_only_model": _Key(no_effect=_CHECKPOINTS),
    "save_total_limit": _Key(no_effect=_CHECKPOINTS),
    "remove_unused_columns": _Key(no_effect=_LOADER),
    "dataloader_num_workers": _Key(no_effect=_LOADER),
    "dataloader_prefetch_factor": _Key(no_effect=_LOADER),
    "dataloader_pin_memory": _Key(no_effect=_LOADER),
    "preprocessing_num_workers": _Key(("mntp",), no_effect=_LOADER),
    "overwrite_cache": _Key(("mntp",), no_effect=_LOADER),
    "experiment_id": _Key(CONTRASTIVE, no_effect="the adapter goes into output_dir itself, not into a subfolder "
                          "named after the experiment"),
}
# The contrastive scripts declare max_train_samples but never read it (a TODO in the reference).
_CONTRASTIVE_MAX_TRAIN_SAMPLES = _Key(CONTRASTIVE, no_effect="the reference's simcse and supervised scripts do not "
                                      "implement it either")

_HUB = ("the reference downloads it from the Hugging Face Hub, and llm2vec-fast never downloads data: save it as a "
        ".txt (one text per line) or .jsonl file and pass --data FILE")
# The reference's own readers of dataset_file_path (llm2vec.dataset), by stage.
_FILE_DATASETS = {"simcse": "Wiki1M", "supervised": "E5"}


def read_config_file(path: str, stage: str, command_line: set | frozenset = frozenset()) -> dict:
    """The TrainConfig values config file `path` sets for `stage` (our keys, the reference's, or both).

    command_line: the fields given explicitly besides the file; they replace the file's, so a reference dataset
    that cannot be read here is no error when `data` is among them. Keys without effect are ConfigWarnings.
    """
    translation = _Translation(path, stage, command_line)
    values = translation.run(_read_mapping(path))
    for message in translation.warnings():
        warnings.warn(message, ConfigWarning, stacklevel=3)
    return values


class _Translation:
    """One config file becoming TrainConfig values (see REFERENCE_KEYS)."""

    def __init__(self, path: str, stage: str, command_line):
        self.path, self.stage, self.command_line = path, stage, command_line
        self.values: dict[str, tuple[object, str]] = {}  # field -> (value, the key that set it)
        self.no_effect: dict[str, list[str]] = {}  # reason -> the keys it applies to
        self.differences: list[str] = []  # where llm2vec-fast honours a key but trains differently

    def run(self, raw: dict) -> dict:
        unknown = sorted(set(raw) - FIELDS - set(REFERENCE_KEYS))
        if unknown:
            raise self.error(f"unknown option(s) {unknown}: neither a TrainConfig option nor a key of the llm2vec "
                             f"reference's train_configs; check the spelling (`llm2vec-fast train --help` lists the "
                             f"options)")
        foreign = [k for k in raw if k in REFERENCE_KEYS and self.stage not in self.rule(k).stages]
        if foreign:
            owners = sorted({s for k in foreign for s in self.rule(k).stages})
            raise self.error(f"{foreign} {'is a key' if len(foreign) == 1 else 'are keys'} of the reference's "
                             f"{' and '.join(owners)} configs, not of {self.stage}; remove "
                             f"{'it' if len(foreign) == 1 else 'them'}, or train the stage the file is for")
        nulls = sorted(k for k, v in raw.items() if v is None)
        if nulls:
            raise self.error(f"{nulls} set to null; give a value or remove the key(s)")
        for key, value in raw.items():
            if key in FIELDS:
                self.set(key, value, key)
            else:
                self.reference_key(key, value)
        if self.stage == "mntp":
            self.mntp_data(raw)
        else:
            self.contrastive_data(raw)
        self.training_length(raw)
        return {name: value for name, (value, _) in self.values.items()}

    def warnings(self) -> list[str]:
        """One message per reason some keys have no effect, then the differences in training."""
        ignored = [f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} no effect in llm2vec-fast: {reason}"
                   for reason, keys in self.no_effect.items()]
        return [f"config file {self.path}: {message}" for message in ignored + self.differences]

    def error(self, message: str) -> ValueError:
        return ValueError(f"config file {self.path}: {message}")

    def set(self, name: str, value, key: str) -> None:
        value = checked_value(name, value, key)
        if name in self.values and self.values[name][0] != value:
            other_value, other = self.values[name]
            raise self.error(f"{other}={other_value!r} and {key}={value!r} both set {name}; keep one of them")
        self.values[name] = (value, key)

    def ignore(self, key: str, reason: str) -> None:
        self.no_effect.setdefault(reason, []).append(key)

    def rule(self, key: str) -> _Key:
        if key == "max_train_samples" and self.stage in CONTRASTIVE:
            return _CONTRASTIVE_MAX_TRAIN_SAMPLES
        return REFERENCE_KEYS[key]

    def reference_key(self, key: str, value) -> None:
        rule = self.rule(key)
        if rule.group:
            return
        if rule.no_effect:
            self.ignore(key, rule.no_effect)
        elif isinstance(rule.to, str):
            self.set(rule.to, value, key)
        elif rule.to is not None:
            try:
                mapped = rule.to(value, self.stage)
            except _Refused as refused:
                raise self.error(f"{key}={value!r}: {refused}") from None
            for name, mapped_value in mapped.items():
                self.set(name, mapped_value, key)
        elif not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in rule.accepts):
            raise self.error(f"{key}={value!r}: {rule.refused}")

    def mntp_data(self, raw: dict) -> None:
        """run_mntp.py reads the Hub dataset dataset_name when it is given, else train_file."""
        name, config_name = raw.get("dataset_name"), raw.get("dataset_config_name")
        if name is not None:
            qualifier = f" (dataset_config_name={config_name!r})" if config_name else ""
            self.need_data("dataset_name", name, f"dataset_name={name!r}{qualifier}: {_HUB}")
            unused = ["train_file", "validation_split_percentage"]
        elif "train_file" in raw:
            self.set("data", raw["train_file"], "train_file")
            share = raw.get("validation_split_percentage", 5)
            if share and "validation_file" not in raw:
                self.differences.append(
                    f"the reference trains on train_file less its first {share}% (validation_split_percentage, "
                    f"held out for evaluation); llm2vec-fast trains on the whole file: cut it first to train on the "
                    f"same texts")
                unused = ["dataset_config_name"]
            else:
                unused = ["dataset_config_name", "validation_split_percentage"]
        else:
            unused = ["dataset_config_name", "validation_split_percentage"]
        for key in unused:
            if key in raw:
                self.ignore(key, "the data it qualifies is not what this file trains on")

    def contrastive_data(self, raw: dict) -> None:
        """run_simcse.py / run_supervised.py read dataset_file_path with the reader dataset_name names."""
        name, path, expected = raw.get("dataset_name"), raw.get("dataset_file_path"), _FILE_DATASETS[self.stage]
        if name not in (None, expected):
            self.need_data("dataset_name", name, f"dataset_name={name!r}: the {self.stage} stage reads "
                           f"{expected!r}-style data; pass --data FILE")
        elif self.stage == "supervised" and path is not None and not path.endswith(".jsonl"):
            self.need_data("dataset_file_path", path, f"dataset_file_path={path!r}: the reference's E5 directory "
                           f"(one file per dataset, instructions from its code) is not read here; convert it to one "
                           f".jsonl of query/positive/negative/instruction/dataset lines and pass --data FILE.jsonl")
        elif path is not None:
            self.set("data", path, "dataset_file_path")

    def need_data(self, key: str, value, message: str) -> None:
        """Data named by `key` that llm2vec-fast cannot read: fine when --data replaces it, else `message`."""
        if "data" in self.command_line:
            return
        if "data" in self.values:
            raise self.error(f"data={self.values['data'][0]!r} and {key}={value!r} both name the training data; "
                             f"keep one of them")
        raise self.error(message)

    def training_length(self, raw: dict) -> None:
        """stop_after_n_steps, max_steps (-1: unset) and num_train_epochs become `steps`."""
        limits = {k: raw[k] for k in ("stop_after_n_steps", "max_steps") if k in raw and raw[k] != -1}
        epochs = raw.get("num_train_epochs")
        if not limits:
            if epochs is not None:
                raise self.error("num_train_epochs: llm2vec-fast trains a number of steps, not epochs; give "
                                 "stop_after_n_steps or max_steps (or --steps)")
            return
        key = min(limits, key=limits.get)  # the Trainer stops at whichever comes first
        self.set("steps", limits[key], key)
        stop, span = limits.get("stop_after_n_steps"), limits.get("max_steps")
        if span is not None and epochs is not None:
            self.ignore("num_train_epochs", "max_steps sets the length of training (as in the reference)")
        if stop is not None and (span is None or span > stop):
            # The Trainer sizes its linear decay by max_steps, else by the epochs (3 by default), not by the stop.
            over = f"max_steps={span} steps" if span is not None else \
                f"{epochs if epochs is not None else 3} epochs (num_train_epochs)"
            self.differences.append(
                f"the reference decays the learning rate linearly over {over} and stops after "
                f"stop_after_n_steps={stop}, so its rate ends near the peak; llm2vec-fast decays it linearly to 0 "
                f"over the steps it runs")


def _read_mapping(path: str) -> dict:
    """The mapping config file `path` holds; a ValueError naming the file (and the line, where the parser gives
    one) for anything else: unreadable, not UTF-8, a syntax error, nesting too deep for the parser, a YAML tag
    that would build a Python object (yaml.safe_load never builds one), keys that are not names."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"config file {path}: not valid UTF-8 (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ValueError(f"config file {path}: cannot be read ({error.strerror})") from None
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        values = _parse_yaml(path, text) if yaml_file else json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    except RecursionError:
        raise ValueError(f"config file {path}: nested too deeply to read; a config file is one flat mapping of "
                         f"option names to values") from None
    if values is None and yaml_file:
        values = {}  # an empty YAML file (or one of comments only)
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    names = [key for key in values if not isinstance(key, str)]
    if names:
        raise ValueError(f"config file {path}: key {names[0]!r} is not an option name; keys are option names such "
                         f"as learning_rate")
    return values


def _parse_yaml(path: str, text: str):
    try:
        import yaml
    except ImportError:
        raise ValueError(f"config file {path} is YAML but PyYAML is not installed: pip install pyyaml, or use "
                         f"JSON") from None
    try:
        return yaml.safe_load(text)  # plain values only: never a tag that builds a Python object
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(error.problem or error.context or "invalid YAML").split())
        if isinstance(error, yaml.constructor.ConstructorError) and "tag:yaml.org,2002:python/" in problem:
            tag = problem.split("tag:yaml.org,2002:", 1)[1].rstrip("'")
            raise ValueError(f"config file {path}: the tag !!{tag}{where} is refused: a config file holds plain "
                             f"values, and a tag that builds Python objects could run code. Remove the tag.") \
                from None
        raise ValueError(f"config file {path}: invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path}: invalid YAML ({' '.join(str(error).split())})") from None
