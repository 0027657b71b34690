"""Hyper-parameters of every stage, with the reference recipes' values as defaults (NOTES.md 1.3).

A config file (JSON, or YAML when PyYAML is installed) holds any subset of the fields; command-line flags
override it. Unknown keys are an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
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
        """The stage's recipe defaults, then the config file, then explicit overrides (None means unset)."""
        config = cls(**STAGE_DEFAULTS[stage])
        if path:
            config = dataclasses.replace(config, **_read_file(path))
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown training option(s) {sorted(unknown)}")
        config = dataclasses.replace(config, **overrides)
        config.validate()
        return config

    def validate(self) -> None:
        positive = ("steps", "batch_size", "block_size", "max_length", "lora_r", "save_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mlm_probability", "lora_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError("mask_replace_prob + random_replace_prob must be <= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.data:
            raise ValueError("no training data: pass --data FILE (or 'data' in the config file)")
        if not self.output:
            raise ValueError("no output directory: pass --output DIR (or 'output' in the config file)")
        if os.path.basename(self.log_file) != self.log_file or self.log_file in ("", ".", ".."):
            raise ValueError(f"log_file must be a file name inside --output, got {self.log_file!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The reference's train_configs (LoRA r=16, alpha=32, dropout 0.05 everywhere; 1000 steps; seed 42).
STAGE_DEFAULTS = {
    "mntp": dict(batch_size=32, learning_rate=5e-5, block_size=512, mlm_probability=0.2, attention_dropout=0.0),
    "simcse": dict(batch_size=128, learning_rate=3e-5, max_length=128, attention_dropout=0.3, scale=20.0),
    "supervised": dict(batch_size=64, learning_rate=2e-4, warmup_steps=300, max_length=512, attention_dropout=0.0,
                       scale=50.0),
}


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise RuntimeError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or use JSON") from None
        values = yaml.safe_load(text) or {}
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"config file {path}: unknown option(s) {sorted(unknown)}")
    return values
