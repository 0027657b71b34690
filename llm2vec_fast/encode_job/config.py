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

from ..choices import DEFAULT_CALIBRATION_ROWS, DEFAULT_SHARD_SIZE
from .corpus import MAX_LINE_BYTES, InputSpec

# The fields that decide the stored embeddings, recorded in the fingerprint under their own names. Device, token
# budget, engine and the options of the run itself are left out on purpose: resuming with a smaller budget after an
# out-of-memory error must stay possible (their effect is float rounding).
FINGERPRINT_FIELDS = ("pooling", "dtype", "max_length", "normalize", "shard_size", "shard_dtype", "format",
                      "text_field", "instruction_field", "instruction", "max_line_bytes")
# Recorded only when they differ from these values, so that outputs written before the options existed still
# resume.
FINGERPRINT_FIELDS_UNLESS = {"output_format": "npy", "id_field": None, "prompt_name": None, "prompt": None,
                             "long_input": "truncate", "chunk_overlap": 0}


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
    prompt_name, prompt: a named prompt of a sentence-transformers model, or a prompt's text, put before every
    line's text that has no instruction of its own (they take --instruction's place; see `line_instruction`).
    long_input, chunk_overlap: what a text longer than max_length becomes (LLM2Vec.long_input: "truncate" or
    "chunk") and the tokens chunk windows share.
    precision, shard_dtype (its older name for float32/float16), truncate_dim, calibration_rows, ranges (a .npy
    file [2, dim]): how the embeddings are stored (storage.py); after `storage.resolve`, precision is set and
    shard_dtype is the stored numpy dtype (int8 / uint8 for binary / ubinary).
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
    prompt_name: str | None = None
    prompt: str | None = None
    pooling: str | None = None
    dtype: str = "float32"
    max_length: int | None = None
    max_batch_tokens: int | None = None
    normalize: bool = False
    long_input: str = "truncate"
    chunk_overlap: int = 0
    device: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_dtype: str | None = None
    precision: str | None = None
    truncate_dim: int | None = None
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS
    ranges: str | None = None
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
        return InputSpec(self.input, self.format, self.text_field, self.instruction_field, self.line_instruction(),
                         self.max_line_bytes, self.id_field, exclude=self.output)

    def line_instruction(self) -> str:
        """What a line without an instruction of its own gets: --prompt, the text of --prompt-name (read from the
        model's config_sentence_transformers.json), else --instruction. An encoder from a sentence-transformers
        directory prepends it as sentence-transformers prepends a prompt; an LLM2Vec encoder takes it as the
        instruction (`LLM2Vec.encode(prompt=...)` alike)."""
        from ..errors import UserError

        if self.prompt is not None and self.prompt_name is not None:
            raise UserError("pass --prompt or --prompt-name, not both.")
        if (self.prompt is not None or self.prompt_name is not None) and self.instruction:
            raise UserError("--instruction and --prompt/--prompt-name both say what goes before each text; pass one.")
        if self.prompt is not None:
            return self.prompt
        if self.prompt_name is not None:
            return named_prompt(self.model, self.prompt_name)
        return self.instruction

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
        # Storage beyond a float cast, recorded only when used (shard_dtype alone describes a float output, as it did
        # before the options existed); the content of --ranges is hashed by fingerprint.py.
        if self.precision not in (None, "float32", "float16"):
            identity["precision"] = self.precision
        if self.truncate_dim is not None:
            identity["truncate_dim"] = self.truncate_dim
        if self.precision in ("int8", "uint8") and self.ranges is None:
            identity["calibration_rows"] = self.calibration_rows
        return identity

    def manifest_fields(self, dim: int) -> dict:
        """What manifest.json records of the run besides its shards; dim: the model's embedding dimension. "dim" is
        the stored arrays' width (ceil(embedding_dim / 8) bytes for binary precisions), "embedding_dim" the
        vectors' dimension after --truncate-dim."""
        from ..quantization import stored_width

        embedding_dim = self.truncate_dim or dim
        return {"dim": stored_width(embedding_dim, self.precision), "dtype": self.shard_dtype,
                "precision": self.precision, "embedding_dim": embedding_dim, "truncate_dim": self.truncate_dim,
                "model": self.model, "peft_model": self.peft_model,
                "pooling": self.pooling, "max_length": self.max_length, "model_dtype": self.dtype,
                "long_input": self.long_input, "chunk_overlap": self.chunk_overlap,
                "normalized": self.normalize, "shard_size": self.shard_size, "input": self.input_spec().name,
                "format": self.format, "instruction": self.instruction, "id_field": self.id_field,
                "prompt_name": self.prompt_name, "prompt": self.prompt}


def named_prompt(model: str, name: str) -> str:
    """The text of the prompt `name` of the sentence-transformers model `model` (a directory or cached hub id), or
    a UserError listing the prompts it has."""
    import json

    from ..errors import UserError
    from ..loading import resolve_directory

    path = os.path.join(resolve_directory(model, "model"), "config_sentence_transformers.json")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f).get("prompts") or {}
    except (OSError, ValueError, AttributeError):
        prompts = {}
    if not isinstance(prompts, dict) or name not in prompts:
        known = ", ".join(map(repr, prompts)) if isinstance(prompts, dict) and prompts else "none"
        raise UserError(f"--prompt-name {name!r}: --model {model!r} has no such prompt (its prompts: {known}, from "
                        f"config_sentence_transformers.json); pass one of them, or the text with --prompt.")
    return prompts[name] or ""


def _model_name(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name
