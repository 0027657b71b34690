"""Random models, a locally trained tokenizer and synthetic text: for tests and for benchmarks on machines that
hold no real checkpoint (the GPU check). Nothing here touches the network.
"""

from __future__ import annotations

import os
import random

import torch

WORDS = ("the cat dog sat on mat a big small red blue house car tree river city man woman child sun moon "
         "rain snow cold hot music song film book paper science school teacher student ran jumped quickly "
         "slowly happy sad apple banana bread water coffee tea green yellow mountain sea boat train plane").split()


def corpus(n: int = 2000, seed: int = 0, min_words: int = 3, max_words: int = 15) -> list[str]:
    """n random sentences over a small vocabulary (deterministic for a seed)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) +
            rng.choice([".", "!", "?", ""]) for _ in range(n)]


def build_tokenizer(directory: str, add_bos: bool = True, vocab_size: int = 512):
    """A byte-level BPE tokenizer with <s>/</s>/<unk>, trained on `corpus()`; BOS prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
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


def model_config(family: str, vocab_size: int, **overrides):
    """A config of `family` (llama, mistral, qwen2, gemma); tiny unless overridden."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        common.setdefault("sliding_window", 4)  # far shorter than test texts: a bidirectional encoder ignores it
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma":
        common.setdefault("head_dim", 16)
        return GemmaConfig(**common)
    raise ValueError(f"unknown family {family!r}")


# Real architectures' shapes, for benchmarks with random weights.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, rope_theta=100000.0)
MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, sliding_window=None, tie_word_embeddings=False)


def random_model(family: str, vocab_size: int, seed: int = 0, spread: float = 0.2, causal_lm: bool = False,
                 dtype=torch.float32, device="cpu", **overrides):
    """A randomly initialised model. `spread` widens the weights so hidden states differ visibly between
    inputs (the default initialisation gives near-identical ones); None keeps the default initialisation."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(family, vocab_size, **overrides)
    with torch.device(device):
        model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config, dtype=dtype)
    if spread is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, spread)
    return model


def build_model_dir(directory: str, family: str, seed: int = 0, add_bos: bool | None = None, **overrides) -> str:
    """Save a tiny random `family` model with its tokenizer into `directory`; return it."""
    os.makedirs(directory, exist_ok=True)
    # Qwen2 tokenizers add no BOS; keep that property so bos_token pooling errors are exercised.
    tokenizer = build_tokenizer(directory, add_bos=(family != "qwen2") if add_bos is None else add_bos)
    random_model(family, len(tokenizer), seed=seed, **overrides).save_pretrained(directory)
    return directory
