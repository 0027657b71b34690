"""llm2vec-fast: decoder LLMs as bidirectional text encoders (the LLM2Vec recipe), encoded and trained fast."""

from .encoder import LLM2Vec
from .modeling import SUPPORTED_MODEL_TYPES, patch

__version__ = "0.1.0"
__all__ = ["LLM2Vec", "patch", "SUPPORTED_MODEL_TYPES", "__version__"]
