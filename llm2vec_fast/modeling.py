"""The thin layer between Hugging Face decoder blocks and our kernels.

`patch(model)` makes a loaded Llama / Mistral / Qwen2 / Gemma model bidirectional and routes its attention
through `llm2vec_fast` attention: packed calls (cu_seqlens passed down by `run_packed`) go to the varlen kernel
(Triton on GPU, the PyTorch path on CPU); ordinary calls with a mask go to PyTorch SDPA with that mask. The
decoder blocks themselves are untouched: norms, rotary embeddings and MLPs are per token, so a batch of texts
concatenated into one row, with position ids restarting at 0 per text, gives each text its own hidden states.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .kernels.attention import varlen_attention

ATTENTION_NAME = "llm2vec_fast"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")


def llm2vec_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """AttentionInterface entry: query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None)."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        # Padded call: the mask says who attends to whom (run_padded passes an explicit 4-D boolean mask; a 2-D
        # mask was turned into an SDPA mask by the mask function registered below).
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=getattr(module, "is_causal", True), **kwargs)
    if getattr(module, "is_causal", False):
        raise NotImplementedError(
            "The packed (varlen) path is bidirectional only; encode a causal model with engine='padded'.")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects all sequences in one row, got batch size {query.shape[0]}")
    # [1, H, T, D] -> [T, H, D]; the kernel reads strided inputs, so no copies beyond what transpose needs.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=scaling, dropout_p=dropout)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, llm2vec_attention)
# Without a registered mask function transformers hands a custom attention a None mask, which would silently drop
# padding in direct (unpacked) calls of a patched model.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; llm2vec-fast supports {', '.join(SUPPORTED_MODEL_TYPES)}. "
            f"Use one of those architectures (e.g. a Llama, Mistral, Qwen2 or Gemma checkpoint).")


def base_model(model):
    """The decoder (LlamaModel and friends) inside a task model or a PEFT wrapper."""
    while hasattr(model, "get_base_model") or hasattr(model, "base_model_prefix"):
        if hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        else:
            inner = getattr(model, model.base_model_prefix, model)
        if inner is model:
            break
        model = inner
    return model


def patch(model, bidirectional: bool = True):
    """Make `model` an llm2vec-fast encoder in place and return it.

    bidirectional: every token attends to every token of its own text (the LLM2Vec conversion); False keeps the
    decoder causal (the uni-directional baseline).
    """
    check_supported(model.config)
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = not bidirectional
    # transformers >= 5.2 builds bidirectional masks from this flag in direct calls with a 2-D mask.
    for config in {id(c): c for c in (model.config, base_model(model).config)}.values():
        config.is_causal = not bidirectional
        config.use_cache = False
    target = base_model(model)
    target.set_attn_implementation(ATTENTION_NAME)
    target._llm2vec_fast_bidirectional = bidirectional
    return model


def is_bidirectional(model) -> bool:
    return getattr(base_model(model), "_llm2vec_fast_bidirectional", False)


def run_packed(model, input_ids, position_ids, cu_seqlens, max_seqlen: int):
    """Hidden states [T, H] of texts packed into one row; cu_seqlens int32 [B+1] marks their boundaries."""
    output = model(
        input_ids=input_ids.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        cu_seq_lens_q=cu_seqlens,
        cu_seq_lens_k=cu_seqlens,
        max_length_q=max_seqlen,
        max_length_k=max_seqlen,
        use_cache=False,
    )
    return output.last_hidden_state[0]


def run_padded(model, input_ids, attention_mask, bidirectional: bool):
    """Hidden states [B, S, H] of a padded batch, with an explicit 4-D boolean mask (no reliance on HF's)."""
    valid = attention_mask.bool()
    allowed = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)  # [B, 1, S, S] "may attend"
    if not bidirectional:
        causal = torch.ones(valid.shape[1], valid.shape[1], dtype=torch.bool, device=valid.device).tril()
        allowed = allowed & causal
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=allowed, position_ids=position_ids, use_cache=False)
    return output.last_hidden_state
