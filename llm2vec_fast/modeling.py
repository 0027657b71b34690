"""The thin layer between Hugging Face decoder blocks and our kernels.

`patch(model)` makes a loaded model of a tested family (`FAMILIES`: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2,
Gemma 3, Phi-3) bidirectional, or keeps it causal, and routes its attention through `llm2vec_fast` attention:
packed calls (cu_seqlens passed down by `run_packed`) go to the varlen kernel (Triton on GPU, the PyTorch path or
the C++ op on CPU) with the layer's causality, sliding window and logit softcap; ordinary calls with a mask go to
PyTorch SDPA with that mask (or, for a layer with a window or a softcap, the eager computation). The
decoder blocks themselves are untouched: norms, rotary embeddings and MLPs are per token, so a batch of texts
concatenated into one row, with position ids restarting at 0 per text, gives each text its own hidden states.

What CPU inference runs instead of the blocks' PyTorch code (the C++ ops, prepared GEMMs) is the CPU runtime's
business (`llm2vec_fast.cpu_runtime`); the attention entry below only asks a module's runtime state whether its
packed calls may take the C++ attention.
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cpu_ops
from .cpu_runtime import swaps
from .cpu_runtime.forwards import cpp_attention_kernel
from .kernels.attention import varlen_attention

ATTENTION_NAME = "llm2vec_fast"


@dataclasses.dataclass(frozen=True)
class Family:
    """What llm2vec-fast knows about one tested decoder family (a `config.model_type`).

    Every family here routes attention through transformers' AttentionInterface with the keyword arguments
    `llm2vec_attention` reads, and its attention modules carry `is_causal`; tests/test_families.py and
    tests/test_modeling.py compare each with its own Hugging Face eager forward, causal and bidirectional.
    """

    name: str  # as the docs and messages name it
    # The RMSNorms scale by (1 + weight) (Gemma's), not by weight: the C++ rms_norm's `gemma` flag.
    gemma_norm: bool = False
    # What a sliding-window layer's window W means once the model is bidirectional, as the family's eager attention
    # computes it: "exclusive" (query i sees key j iff |i - j| < W: Gemma 3's own bidirectional overlay),
    # "inclusive" (|i - j| <= W: transformers' generic bidirectional sliding mask, which is what a config with
    # is_causal=False gets) or "ignored" (the LLM2Vec conversion of Mistral attends over the whole text, as the
    # reference's bidirectional Mistral does). A causal layer always sees keys i - W < j <= i.
    bidirectional_window: str = "inclusive"
    # The attention module's attribute the family passes to its attention function as `softcap` (tanh capping of
    # the scaled logits), if any.
    softcap_attribute: Optional[str] = None
    embedders: str = ""  # the published embedders of the family (documentation only)
    # The model's forward takes a prepared {layer type: mask} mapping as attention_mask (families with layer_types):
    # packed runs hand it None masks, which our attention does not read, instead of letting transformers build
    # [T, T] masks per layer type (a sliding or packed-causal mask is not skipped: seconds per 4k-token batch).
    prepared_masks: bool = False


# The allow-list: one entry per family the test suite checks against Hugging Face. A model type that is not here
# is refused by `check_supported`, even when its attention looks compatible (see `_unsupported_reason`).
FAMILIES = {
    "llama": Family("Llama (Llama 2, Llama 3 with llama3 rope scaling, SmolLM2)",
                    embedders="LLM2Vec-Meta-Llama-3-8B, LLM2Vec-Llama-2-7b"),
    "mistral": Family("Mistral", bidirectional_window="ignored", embedders="LLM2Vec-Mistral-7B, E5-Mistral"),
    "qwen2": Family("Qwen2", prepared_masks=True, embedders="gte-Qwen2, LLM2Vec-Qwen2"),
    "gemma": Family("Gemma", gemma_norm=True),
    "qwen3": Family("Qwen3", prepared_masks=True,
                    embedders="Qwen3-Embedding (causal), voyage-4-nano, pplx-embed (bidirectional)"),
    "gemma2": Family("Gemma 2", gemma_norm=True, softcap_attribute="attn_logit_softcapping", prepared_masks=True,
                     embedders="BGE-multilingual-gemma2"),
    "gemma3_text": Family("Gemma 3 (text)", gemma_norm=True, bidirectional_window="exclusive", prepared_masks=True,
                          embedders="EmbeddingGemma"),
    "phi3": Family("Phi-3"),
}
# The public name of the allow-list (a mapping model_type -> Family: `in`, iteration and join work as on the tuple
# it used to be).
SUPPORTED_MODEL_TYPES = FAMILIES


def family_of(config) -> Family:
    """The Family of a supported `config` (check_supported first)."""
    return FAMILIES[config.model_type]


def kernel_window(family: Family, window: Optional[int], causal: bool, stated_noncausal: bool = False
                  ) -> Optional[int]:
    """The kernels' window (query i sees key j iff |i - j| < window) for a layer the family gives sliding window
    `window` (None: full attention), in the model's mode. stated_noncausal: the checkpoint's own config says
    `is_causal: false` (as an exported or sentence-transformers directory may): transformers then builds the generic
    bidirectional sliding mask (|i - j| <= W) for every family, Gemma 3 included, whose own overlay (|i - j| < W)
    only adds to it."""
    if window is None or causal:
        return window  # causal: i - W < j <= i in every family
    rule = family.bidirectional_window
    if rule == "exclusive" and stated_noncausal:
        rule = "inclusive"
    return {"exclusive": window, "inclusive": window + 1, "ignored": None}[rule]


def stated_noncausal(module) -> bool:
    """Whether the config `module`'s model was loaded with said `is_causal: false` (recorded by `patch`)."""
    return getattr(module, "_llm2vec_fast_stated_noncausal", False)


def module_window(module) -> Optional[int]:
    """The sliding window a family's attention module passes to its attention function (None: full attention).
    Llama-like families keep it on the module (per layer type); Mistral and Phi-3 read it from the config."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    return getattr(getattr(module, "config", None), "sliding_window", None)


def module_softcap(module, family: Family) -> Optional[float]:
    """The logit softcap a family's attention module passes to its attention function, or None."""
    return getattr(module, family.softcap_attribute, None) if family.softcap_attribute else None


def llm2vec_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, **kwargs):
    """AttentionInterface entry: query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None).

    sliding_window / softcap: what the family's attention module passes (Qwen3, Gemma 2 / 3, Mistral, Phi-3); the
    window is translated to the kernels' meaning for the model's mode by `kernel_window`."""
    causal = bool(getattr(module, "is_causal", True))
    window = kernel_window(family_of(module.config), sliding_window, causal, stated_noncausal(module))
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    kwargs.pop("is_causal", None)
    if cu_seqlens is None:
        # Padded call: the mask says who attends to whom (run_padded passes an explicit 4-D boolean mask; a 2-D
        # mask was turned into an SDPA mask by the mask function registered below).
        if window is None and softcap is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=causal, **kwargs)
        return padded_attention(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects all sequences in one row, got batch size {query.shape[0]}")
    # [1, H, T, D] -> [T, H, D]; the kernel reads strided inputs, so no copies beyond what transpose needs.
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    options = dict(causal=causal, window=window, softcap=softcap)
    runtime = swaps.state(module)
    if runtime is not None and runtime.native_attention and dropout == 0.0:
        kernel = cpp_attention_kernel(q, k, v)
        if kernel is not None:
            out = cpu_ops.varlen_attention(q, k, v, cu_seqlens, scaling, kernel=kernel, **options)
            return out.unsqueeze(0), None
    out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=scaling, dropout_p=dropout,
                           **options)
    return out.unsqueeze(0), None


def padded_attention(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap):
    """Attention of a padded batch for a layer with a window or a logit softcap, which SDPA cannot express: the
    family's eager computation (scores in float32) under the mask, the window and causality."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    rows, cols = scores.shape[-2:]
    i = torch.arange(rows, device=scores.device)[:, None] + (cols - rows)
    j = torch.arange(cols, device=scores.device)[None, :]
    allowed = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if causal:
        allowed = allowed & (j <= i)
    if window is not None:
        allowed = allowed & ((i - j).abs() < window)
    if attention_mask is not None:
        mask = attention_mask[..., :cols]
        allowed = allowed & (mask if mask.dtype == torch.bool else mask == 0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row that may see nothing (a padded query) gets zeros rather than NaN; its output is never pooled.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0).to(value.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, llm2vec_attention)
# Without a registered mask function transformers hands a custom attention a None mask, which would silently drop
# padding in direct (unpacked) calls of a patched model.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def check_supported(config) -> None:
    """Raise ValueError unless the model `config`'s model_type is on the allow-list (FAMILIES)."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return
    raise ValueError(
        f"model type {model_type!r} is not supported: {_unsupported_reason(model_type)} llm2vec-fast supports "
        f"{', '.join(FAMILIES)} (the families it tests against Hugging Face). Use a checkpoint of one of those "
        f"architectures.")


def _unsupported_reason(model_type) -> str:
    """Why an unlisted model type is not simply accepted: what its Hugging Face class lacks, when we can tell."""
    if model_type == "gemma3":
        return ("this is the multimodal Gemma 3 config; llm2vec-fast encodes text with the text model "
                "(model_type 'gemma3_text', e.g. EmbeddingGemma or a Gemma3ForCausalLM checkpoint).")
    model_class = None
    try:
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
        import transformers

        class_name = MODEL_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
        model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
    except (ImportError, AttributeError):  # an optional dependency of that model is missing: no class to inspect
        model_class = None
    if model_class is None:
        return "transformers has no decoder model of that type here, and it is not a family llm2vec-fast tests."
    if not getattr(model_class, "_supports_attention_backend", False):
        return (f"its attention ({model_class.__name__}) does not go through transformers' AttentionInterface "
                f"(its class does not set _supports_attention_backend), so llm2vec-fast's packed attention and "
                f"its bidirectional mode (is_causal) cannot be routed into it.")
    return (f"{model_class.__name__} routes attention through transformers' AttentionInterface, but the family is not "
            f"on llm2vec-fast's tested list: whether it honours is_causal (bidirectional mode), and its windows, "
            f"softcaps and norms, have not been checked against its Hugging Face forward.")


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
    target = base_model(model)
    # What the checkpoint's config itself said, before this (or an earlier) patch overwrites it: it decides what a
    # bidirectional sliding window means in transformers (see kernel_window).
    if not hasattr(target, "_llm2vec_fast_stated_noncausal"):
        target._llm2vec_fast_stated_noncausal = getattr(target.config, "is_causal", None) is False
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            module.is_causal = not bidirectional
            module._llm2vec_fast_stated_noncausal = target._llm2vec_fast_stated_noncausal
    # transformers >= 5.2 builds bidirectional masks from config.is_causal in direct calls with a 2-D mask; Gemma 2
    # and Gemma 3 read their own flag, use_bidirectional_attention (Gemma 3's masks and a fresh attention module's
    # is_causal follow it), where the config has it.
    for config in {id(c): c for c in (model.config, base_model(model).config)}.values():
        config.is_causal = not bidirectional
        config.use_cache = False
        if hasattr(config, "use_bidirectional_attention"):
            config.use_bidirectional_attention = bidirectional
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
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))
    masks = {"full_attention": None, "sliding_attention": None} if family is not None and family.prepared_masks \
        else None  # the packed attention reads cu_seqlens, never a mask (see Family.prepared_masks)
    output = model(
        input_ids=input_ids.unsqueeze(0),
        attention_mask=masks,
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
