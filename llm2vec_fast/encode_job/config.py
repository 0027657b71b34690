"""`EncodeJobConfig`: everything an encode job needs to know, typed, whoever starts it (the `llm2vec-fast encode`
command line builds one from its arguments; local, torchrun and Ray runs read it alike).

It also says, in one place, which of its fields identify a run: `identity()` gives those the output's fingerprint
records (a resume with any of them changed is refused) and `manifest_fields()` those manifest.json describes the
output with. Unset options whose value depends on the model or the input (format, dtype, pooling, max_length) are
resolved by `job.resolve_config` before either is computed, so that a resume stating such a default explicitly
is the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ..choices import DEFAULT_SHARD_SIZE
from .corpus import MAX_LINE_BYTES, InputSpec

# The fields that decide the stored embeddings, recorded in the fingerprint under their own names. Device, token
# budget, engine and the options of the run itself are left out on purpose: resuming with a smaller budget after an
# out-of-memory error must stay possible (their effect is float rounding).
FINGERPRINT_FIELDS = ("pooling", "dtype", "max_length", "normalize", "shard_size", "shard_dtype", "format",
                      "text_field", "instruction_field", "instruction", "max_line_bytes")
# Recorded only when they differ from these values, so that outputs written before the options existed still
# resume.
FINGERPRINT_FIELDS_UNLESS = {"output_format": "npy", "id_field": None}


@dataclass(frozen=True)
class EncodeJobConfig:
    """One encode job; each field is the `llm2vec-fast encode` option of the same name (see its --help).

    input: a .txt or .jsonl file, "-" for stdin, a Parquet file or directory, or a datasets directory.
    output: the output directory. format: the input format, "auto" until resolved. model / peft_model: a model
    directory or hub id, and an adapter on top (None: none). pooling, max_length: None until resolved from the
    model. dtype: float32 by default, "auto" until resolved. max_batch_tokens: tokens per batch (None: the
    model's default for the device). device: None for cuda:LOCAL_RANK when CUDA is present, else cpu. progress:
    draw progress bars.
    engine: "local" or "ray"; the ray_* fields size the Ray actor pool.
    """

    input: str
    output: str
    model: str = "smollm2-135m"
    peft_model: str | None = None
    format: str = "auto"
    text_field: str = "text"
    instruction_field: str = "instruction"
    id_field: str | None = None
    instruction: str = ""
    pooling: str | None = None
    dtype: str = "float32"
    max_length: int | None = None
    max_batch_tokens: int | None = None
    normalize: bool = False
    device: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_dtype: str = "float32"
    output_format: str = "npy"
    skip_bad_lines: bool = False
    max_line_bytes: int = MAX_LINE_BYTES
    overwrite: bool = False
    progress: bool = True
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int = 1
    ray_cpus_per_actor: int = 1
    ray_gpus_per_actor: int = 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """Every field's name, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def input_spec(self) -> InputSpec:
        """Where the corpus is and how to read a line of it (format: as resolved, or "auto"); the output directory
        is never part of it (it may lie inside a Parquet input directory)."""
        return InputSpec(self.input, self.format, self.text_field, self.instruction_field, self.instruction,
                         self.max_line_bytes, self.id_field, exclude=self.output)

    def identity(self) -> dict:
        """The fields that identify the run, as the fingerprint records them (the file hashes are added by
        fingerprint.py): the model and adapter by name (a directory by its absolute path) and FINGERPRINT_FIELDS,
        plus FINGERPRINT_FIELDS_UNLESS where they are not at their old default."""
        identity = {name: getattr(self, name) for name in FINGERPRINT_FIELDS}
        identity.update({name: getattr(self, name) for name, old in FINGERPRINT_FIELDS_UNLESS.items()
                         if getattr(self, name) != old})
        identity["model"] = _model_name(self.model)
        if self.peft_model is not None:
            identity["peft_model"] = _model_name(self.peft_model)
        return identity

    def manifest_fields(self, dim: int) -> dict:
        """What manifest.json records of the run besides its shards; dim: the model's hidden size."""
        return {"dim": dim, "dtype": self.shard_dtype, "model": self.model, "peft_model": self.peft_model,
                "pooling": self.pooling, "max_length": self.max_length, "model_dtype": self.dtype,
                "normalized": self.normalize, "shard_size": self.shard_size, "input": self.input_spec().name,
                "format": self.format, "instruction": self.instruction, "id_field": self.id_field}


def _model_name(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name
