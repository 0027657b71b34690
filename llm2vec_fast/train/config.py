"""Hyper-parameters of every stage, with the values of the llm2vec reference's train_configs as defaults.

TrainConfig holds every option; `TrainConfig.for_stage` builds one from a stage's recipe, a config file and
command-line overrides. The file (JSON, or YAML when PyYAML is installed) holds any subset of the TrainConfig fields,
or the keys of the llm2vec 0.2.3 reference's training configs, or both: reference_config.py reads it and translates
the reference's keys. Command-line flags override the file. Unknown options, an option of another stage, and a
value of the wrong type are errors, so nothing is silently dropped; so is a value out of its range (`_RANGES`:
--warmup-steps -5, --mlm-probability 0, a learning rate that is not a finite positive number, ...), named with
its flag and the valid range, before torch is imported or any model loads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES = ("mntp", "simcse", "supervised")
CONTRASTIVE = ("simcse", "supervised")


class ConfigWarning(UserWarning):
    """A config-file key that llm2vec-fast accepts but that has no effect here (the message says why)."""


@dataclass
class TrainConfig:
    """Every training option: those of all stages, then MNTP's, then those of SimCSE and supervised training."""

    # shared
    model: str = "smollm2-135m"
    data: str = ""
    output: str = ""
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: list(LORA_TARGETS))
    save_steps: int = 100
    log_file: str = "train_log.jsonl"
    device: str = ""
    # MNTP
    block_size: int = 512
    mlm_probability: float = 0.2
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    mask_token: str = ""
    # contrastive (SimCSE, supervised)
    max_length: int = 128
    pooling_mode: str = "mean"
    attention_dropout: float = 0.3
    scale: float = 20.0
    gradcache_chunk: int = 0
    peft_model: str = ""
    text_field: str = "text"

    @classmethod
    def for_stage(cls, stage: str, path: str | None = None, **overrides) -> "TrainConfig":
        """The stage's recipe defaults, then the config file `path`, then explicit overrides (None means unset).

        lora_alpha follows lora_r (2 x lora_r, the reference's rule) unless it is given too. A field only other
        stages read (STAGE_FIELDS) is refused unless it holds this stage's default. Keys of the file that have no
        effect here are reported as ConfigWarning.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(overrides) - FIELDS
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        # reference_config imports this module's schema, so it is imported here, when a file is read.
        from .reference_config import read_config_file

        values = read_config_file(path, stage, command_line=set(overrides)) if path else {}
        values.update({name: checked_value(name, value, name) for name, value in overrides.items()})
        _refuse_other_stage_fields(stage, values)
        if "lora_r" in values and "lora_alpha" not in values:
            values["lora_alpha"] = 2 * values["lora_r"]
        config = dataclasses.replace(stage_defaults(stage), **values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError for an option out of range (the message names the option, its flag and the valid
        range), an unknown dtype or pooling mode, no data or output, or a log_file that is not a plain file name.

        Every check here needs neither torch nor a model, so a bad option is refused before anything loads."""
        for name, (allowed, rule) in _RANGES.items():
            value = getattr(self, name)
            if not allowed(value):
                raise ValueError(f"{_option(name, value)} is out of range: it must be {rule}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError(f"mask_replace_prob + random_replace_prob must be <= 1, got {self.mask_replace_prob} + "
                             f"{self.random_replace_prob}")
        if not self.lora_targets or not all(isinstance(t, str) and t.strip() for t in self.lora_targets):
            raise ValueError(f"lora_targets = {self.lora_targets!r}: expected a non-empty list of module names, "
                             f"e.g. {list(LORA_TARGETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        from ..choices import POOLING_MODES  # light: no torch

        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"pooling_mode = {self.pooling_mode!r}: must be one of {', '.join(POOLING_MODES)}")
        if self.device and not _DEVICE.fullmatch(self.device):
            raise ValueError(f"--device {self.device!r}: expected cpu, cuda or cuda:N (or mps, xpu, xpu:N)")
        if not self.text_field:
            raise ValueError("text_field (--text-field) is empty; name the JSONL field that holds the text")
        if not self.data:
            raise ValueError("no training data: pass --data FILE (or 'data' in the config file)")
        if not self.output:
            raise ValueError("no output directory: pass --output DIR (or 'output' in the config file)")
        if os.path.basename(self.log_file) != self.log_file or self.log_file in ("", ".", ".."):
            raise ValueError(f"log_file must be a file name inside --output, got {self.log_file!r}")

    def to_dict(self) -> dict:
        """The options as a dict, field name -> value."""
        return dataclasses.asdict(self)


FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def _at_least(low: int):
    return lambda value: value >= low


def _finite(test):
    return lambda value: math.isfinite(value) and test(value)


# The valid range of each numeric option: (test, the range in words). np.random.seed takes seeds below 2**32.
MAX_SEED = 2**32 - 1
_RANGES = {
    "steps": (_at_least(1), "an integer >= 1"),
    "batch_size": (_at_least(1), "an integer >= 1"),
    "save_steps": (_at_least(1), "an integer >= 1"),
    "warmup_steps": (_at_least(0), "an integer >= 0"),
    "block_size": (_at_least(2), "an integer >= 2 (a token is predicted from the tokens before it)"),
    "max_length": (_at_least(1), "an integer >= 1"),
    "lora_r": (_at_least(1), "an integer >= 1"),
    "lora_alpha": (_at_least(1), "an integer >= 1"),
    "gradcache_chunk": (_at_least(0), "an integer >= 0 (0: the whole batch at once)"),
    "seed": (lambda value: 0 <= value <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "learning_rate": (_finite(lambda value: value > 0), "a finite number > 0"),
    "weight_decay": (_finite(lambda value: value >= 0), "a finite number >= 0"),
    "max_grad_norm": (_finite(lambda value: value > 0), "a finite number > 0"),
    "scale": (_finite(lambda value: value > 0), "a finite number > 0"),
    "mlm_probability": (lambda value: 0.0 < value < 1.0, "a share in (0, 1) (0 masks no token: loss 0, nothing "
                        "learnt; 1 masks every token)"),
    "mask_replace_prob": (lambda value: 0.0 <= value <= 1.0, "in [0, 1]"),
    "random_replace_prob": (lambda value: 0.0 <= value <= 1.0, "in [0, 1]"),
    "lora_dropout": (lambda value: 0.0 <= value < 1.0, "in [0, 1)"),
    "attention_dropout": (lambda value: 0.0 <= value < 1.0, "in [0, 1)"),
}
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
# The options with a command-line flag (cli/train.py); the others are set in a config file only.
_FLAGGED = frozenset({"model", "data", "output", "peft_model", "steps", "batch_size", "learning_rate", "warmup_steps",
                      "dtype", "device", "save_steps", "seed", "block_size", "mlm_probability", "max_length",
                      "attention_dropout", "gradcache_chunk", "text_field"})


def _option(name: str, value) -> str:
    """Option `name` set to `value`, as a user names it: by its flag (and config key), or by its config key."""
    if name in _FLAGGED:
        return f"--{name.replace('_', '-')} {value!r} ({name})"
    return f"{name} = {value!r} (a config file option)"
_DEFAULTS = TrainConfig()  # the type of each field
DTYPES = ("float32", "bfloat16", "float16")

# The reference's train_configs (LoRA r=16, alpha=32, dropout 0.05 everywhere; 1000 steps; seed 42).
STAGE_DEFAULTS = {
    "mntp": dict(batch_size=32, learning_rate=5e-5, block_size=512, mlm_probability=0.2, attention_dropout=0.0),
    "simcse": dict(batch_size=128, learning_rate=3e-5, max_length=128, attention_dropout=0.3, scale=20.0),
    "supervised": dict(batch_size=64, learning_rate=2e-4, warmup_steps=300, max_length=512, attention_dropout=0.0,
                       scale=50.0),
}

# Fields that only some stages read; any other stage would ignore them, so a value other than its default there
# is refused.
STAGE_FIELDS = {
    "block_size": ("mntp",), "mlm_probability": ("mntp",), "mask_replace_prob": ("mntp",),
    "random_replace_prob": ("mntp",), "mask_token": ("mntp",),
    "max_length": CONTRASTIVE, "pooling_mode": CONTRASTIVE, "scale": CONTRASTIVE, "gradcache_chunk": CONTRASTIVE,
    "peft_model": CONTRASTIVE,
    "text_field": ("mntp", "simcse"),  # supervised reads fixed JSONL fields
}


def stage_defaults(stage: str) -> TrainConfig:
    """The recipe of `stage` before any file or flag."""
    return TrainConfig(**STAGE_DEFAULTS[stage])


def stages_using(name: str) -> tuple[str, ...]:
    """The stages that read TrainConfig field `name`."""
    return STAGE_FIELDS.get(name, STAGES)


def _refuse_other_stage_fields(stage: str, values: dict) -> None:
    defaults = stage_defaults(stage)
    for name, value in values.items():
        if stage not in stages_using(name) and value != getattr(defaults, name):
            raise ValueError(f"{name}={value!r} (--{name.replace('_', '-')}) is an option of "
                             f"{' and '.join(stages_using(name))} training; {stage} does not use it. Remove it.")


def checked_value(name: str, value, key: str):
    """`value` for field `name` (set by config key `key`), refused when it has the wrong type; ints widen to
    float for float fields so a file's `20` and `20.0` are the same option."""
    expected = type(getattr(_DEFAULTS, name))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise ValueError(f"{key}={value!r}: expected {'a number' if expected is float else expected.__name__} "
                         f"for {name}")
    return value
