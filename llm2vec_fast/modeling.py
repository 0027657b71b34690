"""The thin layer between Hugging Face decoder blocks and our kernels.

`patch(model)` makes a loaded Llama / Mistral / Qwen2 / Gemma model bidirectional and routes its attention
through `llm2vec_fast` attention: packed calls (cu_seqlens passed down by `run_packed`) go to the varlen kernel
(Triton on GPU, the PyTorch path on CPU); ordinary calls with a mask go to PyTorch SDPA with that mask. The
decoder blocks themselves are untouched: norms, rotary embeddings and MLPs are per token, so a batch of texts
concatenated into one row, with position ids restarting at 0 per text, gives each text its own hidden states.

`use_native_cpu_ops(model)` additionally swaps, per module instance, the RMSNorm / MLP / decoder-layer forwards
(and the family's `apply_rotary_pos_emb`) for the C++ CPU ops of `csrc/` (loaded by `llm2vec_fast.native`). Each
swapped forward takes the native op only for CPU float32 / bfloat16 inputs with no gradient to track and otherwise
calls the forward it replaced, so training and GPU runs are untouched; `LLM2Vec.encode` turns it on for CPU.
"""

from __future__ import annotations

import functools
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import backends, cpu_ops, native
from .batching import check_positive_int
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
    if getattr(module, "_llm2vec_native_attention", False) and dropout == 0.0:
        kernel = _cpp_attention_kernel(q, k, v)
        if kernel is not None:
            return cpu_ops.varlen_attention(q, k, v, cu_seqlens, scaling, kernel=kernel).unsqueeze(0), None
    out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=scaling, dropout_p=dropout)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, llm2vec_attention)
# Without a registered mask function transformers hands a custom attention a None mask, which would silently drop
# padding in direct (unpacked) calls of a patched model.
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _cpp_attention_kernel(q, k, v):
    """"brgemm" or "portable": the C++ kernel `backends` chooses for this call, or None when PyTorch takes it."""
    name = backends.choose("attention", q, k, v).name
    return name[len("cpp-"):] if name.startswith("cpp-") else None


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


# ------------------------------------------------------------------------------------------------ C++ CPU ops

# Native ops `use_native_cpu_ops` can swap in. "add_rms_norm" is the decoder layer's residual add fused into its
# post-attention RMSNorm (a swapped decoder-layer forward).
NATIVE_OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul", "varlen_attention", "attention_block")
# The ones that beat their PyTorch counterpart in benchmarks/bench_native.py (results/native_cpu.json): the
# default set. An op that does not win there is not wired in.
SHIPPED_NATIVE_OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul", "varlen_attention", "attention_block")
_SILU_NAMES = ("SiLU", "SiLUActivation")
_rotary_users: dict = {}  # python module of a model family -> (original apply_rotary_pos_emb, number of models)


_native_eligible = backends.native_eligible


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _native_rms_norm_forward(self, hidden_states):
    if not _native_eligible(hidden_states, self.weight):
        return self._llm2vec_native_original(hidden_states)
    return cpu_ops.rms_norm(hidden_states, self.weight, _eps(self), gemma=self._llm2vec_native_gemma)


def _project(linear, x, out_dtype=None):
    """linear(x) through its prepared CpuLinear when `use_cpu_linears` gave it one (x may then be in the matmul
    dtype or the weights' dtype), else the module itself; the result in out_dtype (default: the GEMM's dtype)."""
    plan = linear.__dict__.get("_llm2vec_cpu_linear")
    y = plan(x) if plan is not None else linear(x.to(linear.weight.dtype))
    return y if out_dtype is None else y.to(out_dtype)


def _block_eligible(x, linear) -> bool:
    """Like _native_eligible for a block whose input may already be in its prepared GEMMs' dtype (the mixed mode
    hands bf16 norm outputs to blocks with fp32 weights)."""
    plan = linear.__dict__.get("_llm2vec_cpu_linear")
    if plan is None or x.dtype != plan.matmul_dtype or x.device.type != "cpu":
        return _native_eligible(x, linear.weight)
    return not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))


def _mixed_dtype(layer, kwargs):
    """The bf16 dtype in which `layer`'s norms can hand their output to its attention and MLP blocks: set when
    the mixed mode's GEMMs, the native attention block and the native MLP are all in place and the call is a packed
    encode; None otherwise (every block then gets the stream's dtype)."""
    q_proj = getattr(layer.self_attn, "q_proj", None)
    plan = layer.self_attn.__dict__.get("_llm2vec_qkv") or \
        (q_proj.__dict__.get("_llm2vec_cpu_linear") if q_proj is not None else None)
    if plan is None or plan.matmul_dtype == layer.post_attention_layernorm.weight.dtype:
        return None
    if kwargs.get("cu_seq_lens_q") is None or "_llm2vec_native_original" not in layer.self_attn.__dict__ \
            or "_llm2vec_native_original" not in layer.mlp.__dict__ \
            or not hasattr(layer.input_layernorm, "_llm2vec_native_gemma"):
        return None
    return plan.matmul_dtype


def _native_mlp_forward(self, x):
    if not _block_eligible(x, self.gate_proj):
        return self._llm2vec_native_original(x.to(self.gate_proj.weight.dtype))
    fused = self.__dict__.get("_llm2vec_gate_up")
    if fused is not None:
        gate, up = fused.split(fused(x))  # one GEMM; silu_mul reads the two halves in place
    else:
        gate, up = _project(self.gate_proj, x), _project(self.up_proj, x)
    # Mixed mode (bf16 GEMMs of an fp32 model): the product goes straight to the down projection's bf16 GEMM, with
    # silu(gate) kept in fp32 inside the op (rounding it too cost 3x in 1 - cosine to fp32).
    hidden = cpu_ops.silu_mul(gate, up, round_act=gate.dtype == self.gate_proj.weight.dtype)
    return _project(self.down_proj, hidden, x.dtype)


def _native_attention_forward(self, hidden_states, *args, **kwargs):
    """The attention block of a packed CPU encode: q/k/v (one fused GEMM when it pays), the C++ rotary and varlen
    attention on [T, H, D] views, o_proj. Any other call (padded, training, a cache) runs the replaced forward."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    position_embeddings = kwargs.get("position_embeddings")
    if (args or cu_seqlens is None or position_embeddings is None or getattr(self, "is_causal", False)
            or (self.training and self.attention_dropout > 0) or hidden_states.dim() != 3
            or hidden_states.shape[0] != 1 or kwargs.get("past_key_values") is not None
            or kwargs.get("cache") is not None or not _block_eligible(hidden_states, self.q_proj)):
        return self._llm2vec_native_original(hidden_states.to(self.q_proj.weight.dtype), *args, **kwargs)
    dtype = hidden_states.dtype
    x = hidden_states[0]  # [T, hidden]
    tokens, head_dim = x.shape[0], self.head_dim
    fused = self.__dict__.get("_llm2vec_qkv")
    if fused is not None:
        q, k, v = fused.split(fused(x))
    else:
        q, k, v = (_project(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
    # q / k / v stay in the GEMM's dtype (views of the fused output, no copies): the attention op computes in fp32
    # whatever it reads, and its output is what o_proj's GEMM consumes.
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    # cos / sin in the stream's dtype: fp32 tables with bf16 q / k (mixed mode) round once, after the rotation.
    cos, sin = position_embeddings
    q, k = cpu_ops.rotary(q, k, cos.reshape(tokens, -1), sin.reshape(tokens, -1))
    # Mixed mode (bf16 q / k / v of an fp32 model): P @ V keeps the probabilities to fp32 accuracy; rounding them to
    # bf16 as the pure-bf16 path does cut the minimum cosine to fp32 from 0.98 to 0.94 on the benchmark texts.
    fp32_probs = q.dtype == torch.bfloat16 and self.o_proj.weight.dtype == torch.float32
    kernel = _cpp_attention_kernel(q, k, v)
    if kernel is None:  # only when a forced kernel is unavailable here: the PyTorch path of the same attention
        out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=self.scaling)
    else:
        out = cpu_ops.varlen_attention(q, k, v, cu_seqlens, self.scaling, fp32_probs=fp32_probs, kernel=kernel)
    return _project(self.o_proj, out.view(tokens, -1), dtype).unsqueeze(0), None


def _native_decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """The decoder layer of Llama / Mistral / Qwen2 / Gemma with the residual add fused into the post-attention
    RMSNorm; everything but the hidden states goes to the attention by keyword, as in the original."""
    norm = self.post_attention_layernorm
    if args or not _native_eligible(hidden_states, norm.weight):
        return self._llm2vec_native_original(hidden_states, *args, **kwargs)
    residual = hidden_states
    mixed = _mixed_dtype(self, kwargs)
    if mixed is not None:
        # The mixed mode: the norms write the bf16 input of the next GEMMs themselves, and the post-attention norm
        # reads the bf16 attention output beside the fp32 stream (no conversion passes).
        first = self.input_layernorm
        hidden_states = cpu_ops.rms_norm(hidden_states, first.weight, _eps(first), gemma=first._llm2vec_native_gemma,
                                         out_dtype=mixed)
    else:
        hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    hidden_states, residual = cpu_ops.rms_norm(hidden_states, norm.weight, _eps(norm), residual=residual,
                                               gemma=norm._llm2vec_native_gemma, out_dtype=mixed)
    # In place: `residual` is the sum the norm op just allocated, seen by nothing else (the layer's input is never
    # written). In the mixed mode this adds the bf16 MLP output into the fp32 stream without a converted copy.
    return residual.add_(self.mlp(hidden_states))


def _native_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Packed encode layout: q [1, Hq, T, D] and k [1, Hkv, T, D] (views of [1, T, H, D]), cos / sin [1, T, D].
        if (unsqueeze_dim != 1 or q.dim() != 4 or q.shape[0] != 1 or cos.dim() != 3 or cos.shape[0] != 1
                or not _native_eligible(q, k, cos, sin)):
            return original(q, k, cos, sin, unsqueeze_dim)
        q_out, k_out = cpu_ops.rotary(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0])
        return q_out.transpose(0, 1).unsqueeze(0), k_out.transpose(0, 1).unsqueeze(0)

    if not isinstance(original, torch.nn.Module):
        apply_rotary_pos_emb._llm2vec_native_original = original
        return apply_rotary_pos_emb

    # transformers >= 5.25 with Hugging Face's `kernels` installed makes the family's apply_rotary_pos_emb a module
    # (kernels' Func), and unpickles each model's private copy of it as `type(<the family's global>)()`: the
    # replacement must be of that type, or a model that ran the native ops no longer pickles (Ray ships models so).
    class NativeRotary(type(original)):
        def forward(self, *args, **kwargs):
            return apply_rotary_pos_emb(*args, **kwargs)

    replacement = NativeRotary()
    replacement.__dict__["_llm2vec_native_original"] = original  # a reference, not a registered submodule
    return replacement


def _swap_forward(module, forward, slot: str = "native", **attributes) -> None:
    """Replace module.forward by partial(forward, module), keeping the replaced one as _llm2vec_<slot>_original
    (the swapped forward falls back to it); slots keep the native-op and the linear swaps independent."""
    key = f"_llm2vec_{slot}_original"
    if key in module.__dict__:
        return
    # partial(function, module) rather than bound methods: a bound method pickles as getattr(module, its name),
    # which the unpickled module lacks, while a partial pickles the module-level function by reference (and a
    # deepcopy rebinds it to the copied module).
    had_instance_forward = "forward" in module.__dict__
    module.__dict__[key] = (module.forward if had_instance_forward
                            else functools.partial(type(module).forward, module))
    module.__dict__[f"_llm2vec_{slot}_had_instance_forward"] = had_instance_forward
    for name, value in attributes.items():
        setattr(module, name, value)
    module.forward = functools.partial(forward, module)


def _restore_forward(module, slot: str = "native") -> None:
    key = f"_llm2vec_{slot}_original"
    if key not in module.__dict__:
        return
    original = module.__dict__.pop(key)
    if module.__dict__.pop(f"_llm2vec_{slot}_had_instance_forward"):
        module.forward = original
    else:
        del module.forward


def _family_module(model):
    """The python module of the model's family (where its apply_rotary_pos_emb lives), or None."""
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            family = sys.modules.get(type(module).__module__)
            return family if family is not None and hasattr(family, "apply_rotary_pos_emb") else None
    return None


def use_native_cpu_ops(model, enable: bool = True, ops=None) -> tuple:
    """Route `model`'s CPU inference through the C++ ops of csrc/ (or undo that with enable=False), in place.

    ops: which of NATIVE_OPS to use (default SHIPPED_NATIVE_OPS). Returns the ops now in use: empty when disabled,
    when the native library cannot be loaded (`llm2vec_fast.native` warns once why) or LLM2VEC_FAST_NATIVE=0.
    Gemma keeps its GELU-tanh MLP in PyTorch (silu_mul does not apply); its (1 + weight) RMSNorm is handled.
    Calling it again with another `ops` replaces the previous choice.
    """
    check_supported(model.config)
    target = base_model(model)
    _disable_native(target)
    if not enable:
        target._llm2vec_fast_native = False
        return ()
    wanted = tuple(SHIPPED_NATIVE_OPS if ops is None else ops)
    unknown = set(wanted) - set(NATIVE_OPS)
    if unknown:
        raise ValueError(f"unknown native ops {sorted(unknown)}; choose from {', '.join(NATIVE_OPS)}")
    if native.load() is None:
        target._llm2vec_fast_native = False
        return ()
    gemma = target.config.model_type == "gemma"
    applied = set()
    for module in target.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            module._llm2vec_native_gemma = gemma
            if "rms_norm" in wanted:
                _swap_forward(module, _native_rms_norm_forward)
                applied.add("rms_norm")
        elif name.endswith("MLP") and "silu_mul" in wanted and not gemma and \
                type(getattr(module, "act_fn", None)).__name__ in _SILU_NAMES and hasattr(module, "gate_proj"):
            _swap_forward(module, _native_mlp_forward)
            applied.add("silu_mul")
        elif name.endswith("DecoderLayer") and "add_rms_norm" in wanted and \
                all(hasattr(module, a) for a in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp")):
            _swap_forward(module, _native_decoder_layer_forward)
            applied.add("add_rms_norm")
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx") and "varlen_attention" in wanted:
            module._llm2vec_native_attention = True
            applied.add("varlen_attention")
            if "attention_block" in wanted and "rotary" in wanted and \
                    all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                # The whole packed attention block: fused q/k/v and the C++ rotary without HF's [B, H, T, D]
                # transposes (a `rotary` request alone keeps HF's block with the swapped apply_rotary_pos_emb).
                _swap_forward(module, _native_attention_forward)
                applied.add("attention_block")
    family = _family_module(target)
    if "rotary" in wanted and family is not None:
        original, users = _rotary_users.get(family.__name__, (family.apply_rotary_pos_emb, 0))
        if users == 0:
            family.apply_rotary_pos_emb = _native_rotary(original)
        _rotary_users[family.__name__] = (original, users + 1)
        target._llm2vec_native_rotary_family = family.__name__
        applied.add("rotary")
    result = tuple(op for op in NATIVE_OPS if op in applied)
    target._llm2vec_fast_native = result
    return result


def native_cpu_ops(model) -> tuple:
    """The native ops `model` uses (empty if none); None when `use_native_cpu_ops` was never called on it."""
    state = getattr(base_model(model), "_llm2vec_fast_native", None)
    return state if state is None else tuple(state or ())


def _disable_native(target) -> None:
    for module in target.modules():
        _restore_forward(module)
        module.__dict__.pop("_llm2vec_native_attention", None)
    family_name = target.__dict__.pop("_llm2vec_native_rotary_family", None)
    if family_name is not None and family_name in _rotary_users:
        original, users = _rotary_users[family_name]
        if users <= 1:
            sys.modules[family_name].apply_rotary_pos_emb = original
            del _rotary_users[family_name]
        else:
            _rotary_users[family_name] = (original, users - 1)


# ------------------------------------------------------------------------------------------- CPU linears

# Linears that read one input, fused into one GEMM when measuring says it pays: (module attribute, members).
_FUSED_GROUPS = (("_llm2vec_qkv", ("q_proj", "k_proj", "v_proj")), ("_llm2vec_gate_up", ("gate_proj", "up_proj")))


def _cpu_linear_forward(self, x):
    if not _native_eligible(x, self.weight):
        return self._llm2vec_linear_original(x)
    return self._llm2vec_cpu_linear(x).to(x.dtype)


def use_cpu_linears(model, enable: bool = True, matmul_dtype=None, tokens: int = 1024, fuse=None,
                    backend=None) -> dict:
    """Route the decoder layers' linears' CPU inference through prepared GEMMs (`cpu_linear.CpuLinear`), in place.

    matmul_dtype: None (the weights' dtype) or torch.bfloat16 for a float32 model: the mixed mode, in which every
        matmul runs in bf16 while the residual stream, norms, attention softmax and pooling stay in float32.
    tokens: rows per GEMM to measure at (the encode's token budget). fuse: one GEMM for q/k/v and for gate/up:
        None measures whether it pays here, True / False force it. backend: "torch" / "onednn" force one (default:
        measured per shape, see `cpu_linear.backend_for`).
    Like the native ops, a swapped forward applies only to CPU float32 / bfloat16 inputs with no gradient to track;
    anything else runs the original. Returns a summary: matmul dtype, backend per GEMM shape, fused groups.
    """
    from .cpu_linear import CpuLinear, fuse_pays

    check_supported(model.config)
    target = base_model(model)
    for module in target.modules():
        _restore_forward(module, slot="linear")
        for name in ("_llm2vec_cpu_linear", *(attribute for attribute, _ in _FUSED_GROUPS)):
            module.__dict__.pop(name, None)
    target.__dict__.pop("_llm2vec_fast_linears", None)
    if not enable:
        target._llm2vec_fast_linears = {}
        return {}
    if matmul_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"matmul_dtype must be None, torch.float32 or torch.bfloat16, got {matmul_dtype!r}")
    check_positive_int("tokens", tokens)
    layers = [m for m in target.modules() if type(m).__name__.endswith("DecoderLayer")]
    summary = {"matmul_dtype": None, "backends": {}, "fused": []}
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                plan = CpuLinear([module], matmul_dtype, tokens, backend)
                _swap_forward(module, _cpu_linear_forward, slot="linear", _llm2vec_cpu_linear=plan)
                summary["matmul_dtype"] = str(plan.matmul_dtype).replace("torch.", "")
        for owner in layer.modules():
            for attribute, names in _FUSED_GROUPS:
                members = [getattr(owner, n, None) for n in names]
                if not all(isinstance(m, torch.nn.Linear) for m in members):
                    continue
                if len({(m.in_features, m.weight.dtype) for m in members}) != 1:
                    continue
                dtype = matmul_dtype or members[0].weight.dtype
                wanted = fuse if fuse is not None else fuse_pays(members[0].in_features,
                                                                 [m.out_features for m in members], dtype, tokens)
                if wanted:
                    owner.__dict__[attribute] = CpuLinear(members, matmul_dtype, tokens, backend)
                    label = "+".join(names)
                    if label not in summary["fused"]:
                        summary["fused"].append(label)
    for layer in layers[:1]:
        for module in layer.modules():
            plans = [module.__dict__.get(a) for a in ("_llm2vec_cpu_linear", *(g for g, _ in _FUSED_GROUPS))]
            for plan in plans:
                if plan is not None:
                    plan.prepare()
                    summary["backends"][f"{plan.in_features}x{sum(plan.splits)}"] = plan.backend
    target._llm2vec_fast_linears = summary
    return summary


def cpu_linears(model):
    """The summary `use_cpu_linears` returned for `model` ({} once disabled), or None when it was never called."""
    return base_model(model).__dict__.get("_llm2vec_fast_linears")
