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


# Families beyond the four of tests/tiny_models.py's FAMILIES, with every feature observable in a tiny random model
# and texts of 10-30 tokens: sliding windows of 8 (shorter than the texts) on some layers, Gemma 2's attention
# logit softcap at 5 (random scores exceed it), Gemma 3's local rotary base apart from the global one, q/k norms
# with non-unit weights, and Llama 3's rope scaling with factors that change the frequencies at these lengths.
NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "llama3")
TEST_WINDOW = 8


def model_config(family: str, vocab_size: int, **overrides):
    """A config of `family` (llama, mistral, qwen2, gemma, and NEW_FAMILIES: qwen3, gemma2, gemma3_text, phi3, and
    llama3, a Llama config with Llama 3's rope scaling); tiny unless overridden."""
    from transformers import AutoConfig, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

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
    if family == "llama3":
        # rope_theta and the llama3 scaling's wavelength band chosen so that the scaling changes some frequencies.
        common.setdefault("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                           "rope_theta": 10000.0})
        return LlamaConfig(**common)
    if family in ("qwen3", "gemma2", "gemma3_text"):
        common.setdefault("head_dim", 16)
        common.setdefault("sliding_window", TEST_WINDOW)
        common.setdefault("layer_types", ["sliding_attention", "full_attention"] * (common["num_hidden_layers"] // 2)
                          + ["sliding_attention"] * (common["num_hidden_layers"] % 2))
        if family == "qwen3":
            common.setdefault("use_sliding_window", True)
            common.setdefault("max_window_layers", 0)
        if family == "gemma2":
            common.setdefault("attn_logit_softcapping", 5.0)
            common.setdefault("query_pre_attn_scalar", 16)
        if family == "gemma3_text":
            common.setdefault("query_pre_attn_scalar", 16)
            common.setdefault("rope_parameters", {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
        return AutoConfig.for_model(family, **common)
    if family == "phi3":
        common.setdefault("sliding_window", TEST_WINDOW)
        # A partial rotary embedding (Phi-4-mini's 0.75 in the same architecture): the C++ rotary must step aside.
        common.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
        common.setdefault("pad_token_id", 2)
        return AutoConfig.for_model(family, **common)
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
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, spread)
                elif family in NEW_FAMILIES and "norm" in name:
                    # Norm weights off their initial value too (q/k norms included), so that a norm applied with
                    # the wrong weight convention ((1 + weight) vs weight) or not at all shows.
                    p.add_(torch.randn_like(p) * spread)
    return model


def build_model_dir(directory: str, family: str, seed: int = 0, add_bos: bool | None = None, **overrides) -> str:
    """Save a tiny random `family` model with its tokenizer into `directory`; return it."""
    os.makedirs(directory, exist_ok=True)
    # Qwen2 / Qwen3 tokenizers add no BOS; keep that property so bos_token pooling errors are exercised.
    tokenizer = build_tokenizer(directory, add_bos=(family not in ("qwen2", "qwen3")) if add_bos is None else add_bos)
    random_model(family, len(tokenizer), seed=seed, **overrides).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------ sentence-transformers directories

# The module type names sentence-transformers writes into modules.json: releases before 6.0 ("old", the spelling of
# most published models) and 6.x ("new").
ST_MODULE_TYPES = {
    "old": {"Transformer": "sentence_transformers.models.Transformer", "Pooling": "sentence_transformers.models.Pooling",
            "Dense": "sentence_transformers.models.Dense", "Normalize": "sentence_transformers.models.Normalize"},
    "new": {"Transformer": "sentence_transformers.base.modules.transformer.Transformer",
            "Pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
            "Dense": "sentence_transformers.base.modules.dense.Dense",
            "Normalize": "sentence_transformers.base.modules.normalize.Normalize"},
}
ST_ACTIVATIONS = {"tanh": "torch.nn.modules.activation.Tanh", "gelu": "torch.nn.modules.activation.GELU",
                  "identity": "torch.nn.modules.linear.Identity"}


def build_st_dir(directory: str, family: str, *, pooling: str = "mean", include_prompt: bool = True,
                 dense: tuple = (), normalize: bool = False, prompts: dict | None = None,
                 default_prompt_name: str | None = None, spelling: str = "new", max_seq_length: int = 2048,
                 add_bos: bool | None = None, append_eos: bool = False, seed: int = 0, extra_modules: tuple = (),
                 **overrides) -> str:
    """Write a tiny random sentence-transformers directory (as sentence-transformers saves one) into `directory`.

    The decoder and tokenizer sit at the root (the Transformer module's path ""), with `overrides` applied to the
    model config (e.g. use_bidirectional_attention=True). pooling: sentence-transformers' mode name. dense: one
    (out_features, activation) per Dense layer, activation a key of ST_ACTIVATIONS (random weights, bias on).
    spelling: "old" writes pre-6.0 module names, the legacy boolean Pooling config, max_seq_length in
    sentence_bert_config.json and pytorch_model.bin Dense weights; "new" writes 6.x names, `pooling_mode`, the limit
    as the tokenizer's model_max_length and model.safetensors. append_eos: the tokenizer appends EOS to every input
    (as Qwen3-Embedding's does). extra_modules: (type, path) entries appended to modules.json as they are.
    """
    import json

    from safetensors.torch import save_file
    from tokenizers import processors
    from transformers import AutoTokenizer

    build_model_dir(directory, family, seed=seed, add_bos=add_bos, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    if append_eos:
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])
    tokenizer.model_max_length = max_seq_length
    tokenizer.save_pretrained(directory)
    hidden = model_config(family, len(tokenizer), **overrides).hidden_size
    types = ST_MODULE_TYPES[spelling]

    def write(relative: str, name: str, value) -> None:
        os.makedirs(os.path.join(directory, relative), exist_ok=True)
        with open(os.path.join(directory, relative, name), "w") as f:
            json.dump(value, f, indent=2)

    modules = [("Transformer", "")]
    if spelling == "old":
        write("", "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
        legacy = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
                  "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                  "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
        pooling_config = {"word_embedding_dimension": hidden, **{key: mode == pooling for mode, key in legacy.items()},
                          "include_prompt": include_prompt}
    else:
        write("", "sentence_bert_config.json", {"transformer_task": "feature-extraction", "modality_config": {
            "text": {"method": "forward", "method_output_name": "last_hidden_state"}},
            "module_output_name": "token_embeddings"})
        pooling_config = {"embedding_dimension": hidden, "pooling_mode": pooling, "include_prompt": include_prompt}
    write("1_Pooling", "config.json", pooling_config)
    modules.append(("Pooling", "1_Pooling"))
    generator = torch.Generator().manual_seed(seed + 1)
    width = hidden
    for k, (out_features, activation) in enumerate(dense):
        folder = f"{len(modules)}_Dense"
        write(folder, "config.json", {"in_features": width, "out_features": out_features, "bias": True,
                                      "activation_function": ST_ACTIVATIONS[activation]})
        state = {"linear.weight": torch.randn(out_features, width, generator=generator) / width ** 0.5,
                 "linear.bias": torch.randn(out_features, generator=generator) * 0.1}
        if spelling == "old":
            torch.save(state, os.path.join(directory, folder, "pytorch_model.bin"))
        else:
            save_file(state, os.path.join(directory, folder, "model.safetensors"))
        modules.append(("Dense", folder))
        width = out_features
    if normalize:
        folder = f"{len(modules)}_Normalize"
        write(folder, "config.json", {})
        modules.append(("Normalize", folder))
    entries = [{"idx": k, "name": str(k), "path": path, "type": types[kind]} for k, (kind, path) in enumerate(modules)]
    entries += [{"idx": len(entries) + k, "name": str(len(entries) + k), "path": path, "type": kind}
                for k, (kind, path) in enumerate(extra_modules)]
    write("", "modules.json", entries)
    write("", "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts or {}, "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine"})
    return directory


def long_text(tokens: int, seed: int = 0) -> str:
    """A text of about `tokens` tokens of `build_tokenizer`'s vocabulary (words from WORDS)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(tokens))
