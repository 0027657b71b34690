"""llm2vec-fast: decoder LLMs as bidirectional text encoders (the LLM2Vec recipe), encoded and trained fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The one place the version is set: pyproject.toml reads it from here (see CHANGELOG.md).
__version__ = "0.2.0"
__all__ = ["LLM2Vec", "patch", "SUPPORTED_MODEL_TYPES", "__version__"]

# The public names live in modules that import torch and transformers (seconds). They are imported on first use,
# so that what needs none of them (`llm2vec-fast --help`, `--version`, an argument error) answers at once.
_LAZY = {"LLM2Vec": ".encoder", "patch": ".modeling", "SUPPORTED_MODEL_TYPES": ".modeling"}

if TYPE_CHECKING:
    from .encoder import LLM2Vec
    from .modeling import SUPPORTED_MODEL_TYPES, patch


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
