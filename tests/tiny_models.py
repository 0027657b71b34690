"""Tiny random Llama / Mistral / Qwen2 / Gemma models and a tokenizer trained locally: no network, seconds to build."""

from __future__ import annotations

import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModel, GemmaConfig, LlamaConfig, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

WORDS = ("the cat dog sat on mat a big small red blue house car tree river city man woman child sun moon "
         "rain snow cold hot music song film book paper science school teacher student ran jumped quickly "
         "slowly happy sad apple banana bread water coffee tea green yellow mountain sea boat train plane").split()

FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + rng.choice([".", "!", "?", ""])
            for _ in range(n)]


def build_tokenizer(directory: str, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 512) with <s>/</s>/<unk>; BOS prepended like Llama's when add_bos."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.save_pretrained(directory)
    return fast


def tiny_config(family: str, vocab_size: int, **overrides):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        # A sliding window far shorter than the test texts: a bidirectional encoder must ignore it.
        return MistralConfig(sliding_window=4, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma":
        return GemmaConfig(head_dim=16, **common)
    raise ValueError(family)


def build_model_dir(directory: str, family: str, seed: int = 0, add_bos: bool | None = None, **overrides) -> str:
    """Save a tiny random `family` model with its tokenizer into `directory`; return it."""
    os.makedirs(directory, exist_ok=True)
    # Qwen2 tokenizers add no BOS; keep that property so bos_token pooling errors are exercised.
    tokenizer = build_tokenizer(directory, add_bos=(family != "qwen2") if add_bos is None else add_bos)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_config(family, len(tokenizer), **overrides))
    # Random init gives near-identical hidden states; a wider weight spread makes differences visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory
