"""The forwards the CPU runtime swaps into Hugging Face modules: the C++ ops of csrc/ and the prepared GEMMs.

Each takes its fast path only for a call it can serve exactly and otherwise calls the forward it replaced, so
training, GPU runs and padded calls are untouched. Whether a call's tensors can take the C++ op (CPU float32 /
bfloat16, nothing autograd would differentiate) is `backends.choose`'s decision; what is left here is the layout
a swapped forward needs (a packed encode, no cache).
Shapes: T tokens of packed texts, H heads, D head dim.
"""

from __future__ import annotations

import torch

from .. import backends, cpu_ops
from ..kernels.attention import varlen_attention
from . import swaps



def _cpp(op: str, *tensors) -> bool:
    """True when `backends` sends this call of `op` to the C++ implementation."""
    return backends.choose(op, *tensors).name == "cpp"


def _eps(norm) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _plan(module, name: str = "linear"):
    found = swaps.state(module)
    return None if found is None else found.plans.get(name)


def cpp_attention_kernel(q, k, v):
    """"brgemm" or "portable": the C++ kernel `backends` chooses for this call, or None when PyTorch takes it."""
    name = backends.choose("attention", q, k, v).name
    return name[len("cpp-"):] if name.startswith("cpp-") else None


def project(linear, x, out_dtype=None):
    """linear(x) through its prepared GEMM when the runtime gave it one (x may then be in the matmul dtype or the
    weights' dtype), else the module itself; the result in out_dtype (default: the GEMM's dtype)."""
    plan = _plan(linear)
    y = plan(x) if plan is not None else linear(x.to(linear.weight.dtype))
    return y if out_dtype is None else y.to(out_dtype)


def _gemm_dtype(linear):
    """The dtype of `linear`'s prepared GEMM, or None without one."""
    plan = _plan(linear)
    return None if plan is None else plan.matmul_dtype


def mixed_dtype(layer, kwargs):
    """The bf16 dtype in which `layer`'s norms can hand their output to its attention and MLP blocks: set when the
    mixed mode's GEMMs, the native attention block and the native MLP are all in place and the call is a packed
    encode; None otherwise (every block then gets the stream's dtype)."""
    q_proj = getattr(layer.self_attn, "q_proj", None)
    plan = _plan(layer.self_attn, "qkv") or (_plan(q_proj) if q_proj is not None else None)
    if plan is None or plan.matmul_dtype == layer.post_attention_layernorm.weight.dtype:
        return None
    norm = swaps.state(layer.input_layernorm)
    if kwargs.get("cu_seq_lens_q") is None or not swaps.is_swapped(layer.self_attn, "native") \
            or not swaps.is_swapped(layer.mlp, "native") or norm is None or norm.gemma_norm is None:
        return None
    return plan.matmul_dtype


# ----------------------------------------------------------------------------------------------------- RMSNorm


def rms_norm_forward(self, hidden_states):
    if not _cpp("rms_norm", hidden_states, self.weight):
        return swaps.original(self, "native")(hidden_states)
    return cpu_ops.rms_norm(hidden_states, self.weight, _eps(self), gemma=swaps.state(self).gemma_norm)


# --------------------------------------------------------------------------------------------------------- MLP


def mlp_forward(self, x):
    if not _cpp("mlp", x, self.gate_proj.weight, _gemm_dtype(self.gate_proj)):
        return swaps.original(self, "native")(x.to(self.gate_proj.weight.dtype))
    fused = _plan(self, "gate_up")
    if fused is not None:
        gate, up = fused.split(fused(x))  # one GEMM; silu_mul reads the two halves in place
    else:
        gate, up = project(self.gate_proj, x), project(self.up_proj, x)
    # Mixed mode (bf16 GEMMs of an fp32 model): the product goes straight to the down projection's bf16 GEMM, with
    # silu(gate) kept in fp32 inside the op (rounding it too cost 3x in 1 - cosine to fp32).
    hidden = cpu_ops.silu_mul(gate, up, round_act=gate.dtype == self.gate_proj.weight.dtype)
    return project(self.down_proj, hidden, x.dtype)


# ------------------------------------------------------------------------------------------------- attention


def attention_forward(self, hidden_states, *args, **kwargs):
    """The attention block of a packed CPU encode: q/k/v (one fused GEMM when it pays), the C++ rotary and varlen
    attention on [T, H, D] views, o_proj. Any other call (padded, training, a cache) runs the replaced forward."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    position_embeddings = kwargs.get("position_embeddings")
    if (args or cu_seqlens is None or position_embeddings is None
            or position_embeddings[0].shape[-1] != self.head_dim  # partial rotary (Phi-4-mini): HF's block
            or (self.training and self.attention_dropout > 0) or hidden_states.dim() != 3
            or hidden_states.shape[0] != 1 or kwargs.get("past_key_values") is not None
            or kwargs.get("cache") is not None
            or not _cpp("attention_block", hidden_states, self.q_proj.weight, _gemm_dtype(self.q_proj))):
        return swaps.original(self, "native")(hidden_states.to(self.q_proj.weight.dtype), *args, **kwargs)
    dtype = hidden_states.dtype
    x = hidden_states[0]  # [T, hidden]
    tokens, head_dim = x.shape[0], self.head_dim
    fused = _plan(self, "qkv")
    if fused is not None:
        q, k, v = fused.split(fused(x))
    else:
        q, k, v = (project(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
    # q / k / v stay in the GEMM's dtype (views of the fused output, no copies): the attention op computes in fp32
    # whatever it reads, and its output is what o_proj's GEMM consumes.
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    # Qwen3 / Gemma 3: the per-head RMSNorm of q and k over head_dim, before the rotary embedding.
    q, k = (_head_norm(getattr(self, name, None), t) for name, t in (("q_norm", q), ("k_norm", k)))
    # cos / sin in the stream's dtype: fp32 tables with bf16 q / k (mixed mode) round once, after the rotation.
    cos, sin = position_embeddings
    q, k = cpu_ops.rotary(q, k, cos.reshape(tokens, -1), sin.reshape(tokens, -1))
    # Mixed mode (bf16 q / k / v of an fp32 model): P @ V keeps the probabilities to fp32 accuracy; rounding them to
    # bf16 as the pure-bf16 path does cut the minimum cosine to fp32 from 0.98 to 0.94 on the benchmark texts.
    fp32_probs = q.dtype == torch.bfloat16 and self.o_proj.weight.dtype == torch.float32
    options = attention_options(self)
    kernel = cpp_attention_kernel(q, k, v)
    if kernel is None:  # only when a forced kernel is unavailable here: the PyTorch path of the same attention
        out = varlen_attention(q, k, v, cu_seqlens, kwargs["max_length_q"], softmax_scale=self.scaling, **options)
    else:
        out = cpu_ops.varlen_attention(q, k, v, cu_seqlens, self.scaling, fp32_probs=fp32_probs, kernel=kernel,
                                       **options)
    return project(self.o_proj, out.view(tokens, -1), dtype).unsqueeze(0), None


def attention_options(module) -> dict:
    """causal / window / softcap of an attention module's call, as the family's own forward passes them to
    `modeling.llm2vec_attention` (which reads them from its keyword arguments instead)."""
    # modeling imports this module: import it here.
    from ..modeling import family_of, kernel_window, module_softcap, module_window, stated_noncausal

    family = family_of(module.config)
    causal = bool(getattr(module, "is_causal", True))
    return dict(causal=causal, window=kernel_window(family, module_window(module), causal, stated_noncausal(module)),
                softcap=module_softcap(module, family))


def _head_norm(norm, x):
    """norm (an RMSNorm over head_dim, or None) of x [T, H, D] with the C++ rms_norm, in x's dtype. The mixed
    mode's bf16 q / k are normed in float32 against the float32 weight and rounded once."""
    if norm is None:
        return x
    state = swaps.state(norm)
    gemma = bool(state is not None and state.gemma_norm)
    return cpu_ops.rms_norm(x.to(norm.weight.dtype), norm.weight, _eps(norm), gemma=gemma, out_dtype=x.dtype)


# --------------------------------------------------------------------------------------------- decoder layer


def decoder_layer_forward(self, hidden_states, *args, **kwargs):
    """The decoder layer of Llama / Mistral / Qwen2 / Qwen3 / Gemma (two norms, attention, MLP: nothing else) with
    the residual add fused into the post-attention RMSNorm; everything but the hidden states goes to the attention
    by keyword, as in the original."""
    norm = self.post_attention_layernorm
    if args or not _cpp("rms_norm", hidden_states, norm.weight):
        return swaps.original(self, "native")(hidden_states, *args, **kwargs)
    residual = hidden_states
    mixed = mixed_dtype(self, kwargs)
    if mixed is not None:
        # The mixed mode: the norms write the bf16 input of the next GEMMs themselves, and the post-attention norm
        # reads the bf16 attention output beside the fp32 stream (no conversion passes).
        first = self.input_layernorm
        hidden_states = cpu_ops.rms_norm(hidden_states, first.weight, _eps(first),
                                         gemma=_gemma_norm(first), out_dtype=mixed)
    else:
        hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    hidden_states, residual = cpu_ops.rms_norm(hidden_states, norm.weight, _eps(norm), residual=residual,
                                               gemma=_gemma_norm(norm), out_dtype=mixed)
    # In place: `residual` is the sum the norm op just allocated, seen by nothing else (the layer's input is never
    # written). In the mixed mode this adds the bf16 MLP output into the fp32 stream without a converted copy.
    return residual.add_(self.mlp(hidden_states))


def _gemma_norm(norm) -> bool:
    found = swaps.state(norm)
    return bool(found is not None and found.gemma_norm)


# ------------------------------------------------------------------------------------------------ linear


def linear_forward(self, x):
    if not backends.native_eligible(x, self.weight):  # a prepared GEMM is not a backend choice: CPU inference only
        return swaps.original(self, "linear")(x)
    return _plan(self)(x).to(x.dtype)
