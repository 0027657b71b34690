"""Unsupervised SimCSE, step 3 of LLM2Vec: a sentence and itself, seen through two different dropout masks, are a
positive pair; the other sentences of the batch are negatives.

Both views of every sentence go through ONE packed forward (2B sequences), each with its own attention-dropout
mask from the attention kernel (dropout 0.3 by default) and LoRA dropout; they are mean-pooled over the text's
tokens exactly as `encode` pools (the reference trained with a different pooling than it encoded with).
"""

from __future__ import annotations

import torch

from ..encoder import LLM2Vec
from .config import TrainConfig
from .contrastive import ContrastiveStage
from .data import read_texts
from .loop import seed_everything


def load_encoder(config: TrainConfig) -> LLM2Vec:
    """The encoder to train: config.model (an MNTP output merges its adapter), attention dropout from config."""
    return LLM2Vec.from_pretrained(config.model, peft_model_name_or_path=config.peft_model or None, merge_peft=True,
                                   dtype=getattr(torch, config.dtype), attention_dropout=config.attention_dropout,
                                   pooling_mode=config.pooling_mode, max_length=config.max_length)


class SimCSEStage(ContrastiveStage):
    """Unsupervised SimCSE on the texts of config.data: a text's positive is itself under other dropout masks."""

    name = "simcse"

    def __init__(self, config: TrainConfig, encoder: LLM2Vec | None = None):
        texts = read_texts(config.data, config.text_field)  # bad data is named (file:line) before the model loads
        seed_everything(config.seed)  # the LoRA initialisation draws from the global RNG
        super().__init__(config, encoder or load_encoder(config))
        self.texts = texts
        self.rows = self.encoder.tokenize_inputs(self.texts)
        self.num_examples = len(self.rows)
        self.check_examples("texts")

    def example_rows(self, indices):
        """The rows of texts `indices` as queries, the same rows as positives, and no negatives."""
        rows = [self.rows[i] for i in indices]
        return rows, list(rows), []
