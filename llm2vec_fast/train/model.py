"""Models for training: the base decoder made bidirectional, with LoRA adapters through peft."""

from __future__ import annotations

import torch

from ..loading import WEIGHT_FILES, resolve_directory
from ..model_checks import NO_REMOTE_CODE, check_config, check_weights_fit_config, weights_size
from ..modeling import enable_gradient_checkpointing, patch, peft_wrapping
from .config import TrainConfig


def lora_config(config: TrainConfig):
    """The peft LoraConfig for `config`: rank, alpha, dropout and target modules; biases not trained."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets), bias="none")


def add_lora(base, config: TrainConfig):
    """Wrap a base decoder (LlamaModel & co.) with trainable LoRA adapters; everything else is frozen.

    The adapter is attached to the base decoder, not to a task model around it, so its saved keys load onto
    `AutoModel` exactly like the released LLM2Vec adapters.
    """
    from peft import get_peft_model

    if config.gradient_checkpointing:
        enable_gradient_checkpointing(base, {"use_reentrant": False})
    # peft keeps bf16/fp16 adapter weights in fp32 (autocast_adapter_dtype), so updates stay stable.
    with peft_wrapping():
        return get_peft_model(base, lora_config(config))


def load_causal_lm(config: TrainConfig):
    """(bidirectional causal-LM model, tokenizer, resolved base directory) for MNTP; weights in config.dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_directory(config.model, "model")
    model_config = check_config(directory)  # no custom code, sane sizes (llm2vec_fast.model_checks)
    check_weights_fit_config(model_config, directory, weights_size(directory, WEIGHT_FILES))
    # use_kernels=False: no Hugging Face hub kernels (see llm2vec_fast.loading.load_base_model).
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, config.dtype),
                                                 attention_dropout=config.attention_dropout, use_kernels=False,
                                                 **NO_REMOTE_CODE)
    patch(model, bidirectional=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, **NO_REMOTE_CODE)
    return model, tokenizer, directory
