"""llm2vec-fast: decoder LLMs as bidirectional text encoders (the LLM2Vec recipe), encoded and trained fast."""

from .encoder import LLM2Vec
from .modeling import SUPPORTED_MODEL_TYPES, patch

# The one place the version is set: pyproject.toml reads it from here (see CHANGELOG.md).
__version__ = "0.2.0"
__all__ = ["LLM2Vec", "patch", "SUPPORTED_MODEL_TYPES", "__version__"]
