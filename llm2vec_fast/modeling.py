"""The thin layer between Hugging Face decoder blocks and our kernels.

`patch(model)` makes a loaded Llama / Mistral / Qwen2 / Gemma model bidirectional and routes its attention
through `llm2vec_fast` attention: packed calls (cu_seqlens passed down by `run_packed`) go to the varlen kernel
(Triton on GPU, the PyTorch path on CPU); ordinary calls with a mask go to PyTorch SDPA with that mask. The
decoder blocks themselves are untouched: norms, rotary embeddings and MLPs are per token, so a batch of texts
concatenated into one row, with position ids restarting at 0 per text, gives each text its own hidden states.

What CPU inference runs instead of the blocks' PyTorch code (the C++ ops, prepared GEMMs) is the CPU runtime's
business (`llm2vec_fast.cpu_runtime`); the attention entry below only asks a module's runtime state whether its
packed calls may take the C++ attention.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cpu_ops
from .cpu_runtime import swaps
from .cpu_runtime.forwards import cpp_attention_kernel
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
    runtime = swaps.state(module)
    if runtime is not None and runtime.native_attention and dropout == 0.0:
        kernel = cpp_attention_kernel(q, k, v)
        if kernel is not None:
            return cpu_ops.varlen_attention(q, k, v, cu_seqlens, scaling, kernel=kernel).unsqueeze(0), None
    out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=scaling, dropout_p=dropout)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, llm2vec_attention)
# Without a registered mask function transformers hands a custom attention a None mask, which would silently drop
# padding in direct (unpacked) calls of a patched model.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def check_supported(config) -> None:
    """Raise ValueError unless the model `config`'s model_type is one of SUPPORTED_MODEL_TYPES."""
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
    # A model loaded by transformers >= 5.25 with Hugging Face's `kernels` installed is kernelized by default, and
    # re-kernelized on every train()/eval() switch, which replaces layer forwards behind our back: reset it to the
    # PyTorch forwards and turn that off (`llm2vec_fast.loading` loads with use_kernels=False in the first place).
    if getattr(target, "use_kernels", False):
        target.use_kernels = False
    target.set_attn_implementation(ATTENTION_NAME)
    target._llm2vec_fast_bidirectional = bidirectional
    return model


def enable_gradient_checkpointing(model, checkpoint_kwargs: dict | None = None, **options) -> None:
    """Make `model` (a Hugging Face PreTrainedModel: the base decoder, or a task model around it) recompute each
    decoder layer's activations in the backward pass.

    checkpoint_kwargs: passed to torch.utils.checkpoint (e.g. {"use_reentrant": False}); options: the HF method's
    others (every_n_layers, offload on transformers versions that have them)."""
    # transformers 5.2x renamed the method and warns on the old name; 5.17 has only the old one.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **options)


@contextmanager
def peft_wrapping():
    """The scope in which we wrap a model with PEFT (get_peft_model, PeftModel.from_pretrained).

    PEFT reads `model.is_gradient_checkpointing` whenever it wraps a model, and transformers >= 5.2x answers that
    old name with a FutureWarning, on every `train` and every load with an adapter. The deprecated call is PEFT's,
    made on our behalf; nothing the user can change, so exactly that warning is filtered here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_bidirectional(model) -> bool:
    """True when `patch` made `model` (the decoder inside it) bidirectional."""
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
