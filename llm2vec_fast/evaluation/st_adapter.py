"""sentence-transformers (6.x) integration: `LLM2VecModule`, an input module holding an `LLM2Vec` encoder.

    from sentence_transformers import SentenceTransformer
    from llm2vec_fast.evaluation.st_adapter import LLM2VecModule

    model = SentenceTransformer(modules=[LLM2VecModule.from_pretrained("smollm2-135m")], device="cpu")
    model.encode(["a text"], prompt="Retrieve relevant passages:")   # the prompt becomes the LLM2Vec instruction
    model.save("my-st-model")
    model = load_sentence_transformer("my-st-model")                  # no trust_remote_code needed

The module does its own tokenization, packing and pooling (the llm2vec-fast engine), so a SentenceTransformer built
from it embeds exactly like `LLM2Vec.encode`, batch by batch. A `prompt` is not prepended to the text as
sentence-transformers does for plain transformers: it becomes the instruction of an [instruction, text] input, so
it is attended to but not pooled (LLM2Vec's rule). The forward pass is differentiable, so sentence-transformers
training works too. `output_value="token_embeddings"` gives the hidden states of each text's pooled tokens (the
text without its instruction and BOS).

Reloading: a saved model's modules.json names this class. sentence-transformers (>= 6) imports a class outside its
own package only with `trust_remote_code=True`, whatever the class: `SentenceTransformer(path)` alone refuses it,
and `SentenceTransformer(path, trust_remote_code=True)` imports it from the installed llm2vec-fast.
`load_sentence_transformer(path)` needs neither: it hands sentence-transformers this class directly (its own
mechanism for modules already imported), so nothing named by the directory is imported at all.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from sentence_transformers.base.modules.input_module import InputModule

from ..batching import PackedBatch, PaddedBatch

MODULE_CONFIG = "llm2vec_fast_module.json"


class LLM2VecModule(InputModule):
    """A sentence-transformers input module: texts -> llm2vec-fast batch -> {"sentence_embedding": [B, H]}."""

    config_file_name = MODULE_CONFIG  # not config.json: that name belongs to the Hugging Face model config
    config_keys = ["enable_bidirectional"]
    save_in_root = True

    def __init__(self, encoder, enable_bidirectional: bool | None = None):
        super().__init__()
        from ..modeling import is_bidirectional

        self.encoder = encoder
        self.enable_bidirectional = is_bidirectional(encoder.model) if enable_bidirectional is None \
            else enable_bidirectional

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, **kwargs) -> "LLM2VecModule":
        """`LLM2Vec.from_pretrained(model_name_or_path, **kwargs)` as a module."""
        from ..encoder import LLM2Vec

        return cls(LLM2Vec.from_pretrained(model_name_or_path, **kwargs))

    # ----------------------------------------------------------------------------------------- module API

    @property
    def max_seq_length(self) -> int:
        """The encoder's max_length: tokens per input, instruction included (setting it sets the encoder's)."""
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.encoder.max_length = int(value)

    @property
    def tokenizer(self):
        """The encoder's Hugging Face tokenizer."""
        return self.encoder.tokenizer

    def get_embedding_dimension(self) -> int:
        """H, the size of a sentence embedding (the model's hidden size)."""
        return self.encoder.config.hidden_size

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, Any]:
        """Tokenize texts (or [instruction, text] pairs) into one llm2vec-fast batch, as a dict of tensors."""
        items = []
        for item in inputs:
            if isinstance(item, str):
                items.append([prompt, item] if prompt else item)
            elif isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
                items.append(list(item))
            else:
                raise TypeError(f"LLM2VecModule takes texts or [instruction, text] pairs, got {type(item).__name__}")
        batch = self.encoder.make_batch(self.encoder.tokenize_inputs(items))
        if isinstance(batch, PackedBatch):
            return {"input_ids": batch.input_ids, "position_ids": batch.position_ids,
                    "cu_seqlens": batch.cu_seqlens, "max_seqlen": batch.max_seqlen,
                    "pool_starts": batch.pool_starts, "pool_ends": batch.pool_ends}
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "pool_starts": batch.pool_starts, "pool_ends": batch.pool_ends}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        """Embed the batch that `preprocess` made; returns `features` with "sentence_embedding" [B, H] float32 added.

        Also adds "token_embeddings" [B, L, H] float32, each text's pooled tokens right-padded, with their
        "attention_mask" [B, L] (which replaces the model's).
        """
        if "cu_seqlens" in features:
            batch = PackedBatch(features["input_ids"], features["position_ids"], features["cu_seqlens"],
                                int(features["max_seqlen"]), features["pool_starts"], features["pool_ends"])
        else:
            batch = PaddedBatch(features["input_ids"], features["attention_mask"], features["pool_starts"],
                                features["pool_ends"])
        hidden = self.encoder.hidden_states(batch)
        features["sentence_embedding"] = self.encoder.pool(hidden, batch).float()
        features["token_embeddings"], features["attention_mask"] = _pooled_tokens(hidden, batch.pool_starts,
                                                                                  batch.pool_ends)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Save the encoder (`LLM2Vec.save`) and this module's config to `output_path`; other arguments are ignored."""
        self.encoder.save(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs) -> "LLM2VecModule":
        """Called by `SentenceTransformer(path)` for a saved model (modules.json names this class)."""
        from ..encoder import LLM2Vec

        directory = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        options = {}
        config_path = os.path.join(directory, MODULE_CONFIG)
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                options = json.load(f)
        model_kwargs = dict(kwargs.get("model_kwargs") or {})
        dtype = model_kwargs.pop("torch_dtype", None) or model_kwargs.pop("dtype", None)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        if dtype is not None and dtype != "auto":
            model_kwargs["dtype"] = dtype
        encoder = LLM2Vec.from_pretrained(directory, enable_bidirectional=options.get("enable_bidirectional", True),
                                          **model_kwargs)
        return cls(encoder, enable_bidirectional=options.get("enable_bidirectional", True))


def _pooled_tokens(hidden, starts, ends) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's pooled rows of `hidden` [T, H], right-padded: ([B, L, H] states, [B, L] mask).

    sentence-transformers reads `token_embeddings` with `attention_mask` for output_value="token_embeddings"; the
    mask here marks the pooled tokens (the model's own attention mask was consumed by the forward pass).
    """
    lengths = (ends - starts).clamp(min=0)
    width = max(int(lengths.max()) if lengths.numel() else 0, 1)
    offsets = torch.arange(width, device=hidden.device)
    mask = offsets[None, :] < lengths[:, None]  # [B, L]
    rows = (starts[:, None] + offsets[None, :]).clamp(max=hidden.shape[0] - 1)  # [B, L]
    tokens = hidden[rows] * mask[..., None].to(hidden.dtype)  # [B, L, H]
    return tokens.float(), mask.long()


def to_sentence_transformer(encoder, device: str | None = None, **kwargs):
    """A `SentenceTransformer` around an `LLM2Vec` (kwargs go to the SentenceTransformer constructor)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[LLM2VecModule(encoder)], device=device, **kwargs)


def load_sentence_transformer(path: str, device: str | None = None, **kwargs):
    """Reload a SentenceTransformer saved with an `LLM2VecModule` (a local directory), without
    `trust_remote_code`: this module's class is handed to sentence-transformers, and any other class outside
    sentence-transformers is refused."""
    from sentence_transformers import SentenceTransformer

    modules_file = os.path.join(path, "modules.json")
    if not os.path.isfile(modules_file):
        raise FileNotFoundError(f"{path!r} has no modules.json: it is not a saved SentenceTransformer. Save one with "
                                f"to_sentence_transformer(encoder).save(path).")
    with open(modules_file, encoding="utf-8") as f:
        types = {m["type"] for m in json.load(f)}
    ours = f"{__name__}.{LLM2VecModule.__name__}"
    foreign = {t for t in types if not t.startswith("sentence_transformers.") and t != ours}
    if foreign:
        raise ValueError(f"{path}: modules.json names classes outside sentence-transformers and llm2vec-fast "
                         f"({sorted(foreign)}); load it with SentenceTransformer(..., trust_remote_code=True) "
                         f"if you trust them")
    if hasattr(SentenceTransformer, "_load_with_module_classes"):
        return SentenceTransformer._load_with_module_classes(path, {ours: LLM2VecModule}, device=device, **kwargs)
    # sentence-transformers before 6.x: it imports installed classes without asking.
    return SentenceTransformer(path, device=device, **kwargs)
