"""Host functions of the C++ CPU ops (csrc/cpu_ops.cpp), each next to its PyTorch reference.

Inference only: the ops have no backward, so callers (the CPU runtime, llm2vec_fast.cpu_runtime) use them only when no input
needs a gradient. Each host function allocates its outputs (NaN-filled when tests set kernels/_common.py's
POISON_OUTPUTS) and calls ``torch.ops.llm2vec_fast.<op>``; `native.load()` must have returned a library first. Inputs are CPU
float32 / bfloat16 tensors with a contiguous last dim; the references run in any dtype (tests use float64). The
attention's reference is the Triton kernel's, `llm2vec_fast.kernels.attention.naive_varlen_attention`.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from . import settings
from .kernels import _common


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An output like `like` (its device, its dtype unless `dtype`), NaN-filled under the tests' poisoning
    switch, which the C++ ops share with the Triton ops (kernels/_common.py)."""
    return _common._alloc(shape, dtype or like.dtype, like.device)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] without a copy when the layout allows it."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# ------------------------------------------------------------------------------------------------------ RMSNorm


def rms_norm(x, weight, eps: float, residual=None, gemma: bool = False, out_dtype=None):
    """RMSNorm of x [..., H] with weight [H] (same dtype). gemma: scale by (1 + weight) in fp32 (GemmaRMSNorm).
    With residual (same shape as x): returns (norm(x + residual), x + residual), the decoder layer's add fused in;
    else norm(x). The residual stream's dtype is the residual's (x may then be the other float dtype: a bf16
    projection output beside an fp32 stream), else x's; weight and x + residual have it. out_dtype: the norm's
    output dtype (default: the stream's), e.g. bf16 for the next bf16 GEMM, rounded once."""
    shape = x.shape
    stream = residual.dtype if residual is not None else x.dtype
    x2 = _rows(x)
    out = _alloc(x2.shape, x, out_dtype or stream)
    total = None
    if residual is not None:
        total = _alloc(x2.shape, residual)
        torch.ops.llm2vec_fast.rms_norm(x2, _rows(residual), weight, float(eps), gemma, out, total)
        return out.view(shape), total.view(shape)
    torch.ops.llm2vec_fast.rms_norm(x2, None, weight, float(eps), gemma, out, None)
    return out.view(shape)


def rms_norm_reference(x, weight, eps: float, residual=None, gemma: bool = False, out_dtype=None):
    """LlamaRMSNorm / GemmaRMSNorm (and the residual add before them), computed in float32 or wider; the stream
    in the residual's dtype, the output cast to out_dtype (see `rms_norm`)."""
    if residual is not None:
        total = x.to(residual.dtype) + residual
        return rms_norm_reference(total, weight, eps, gemma=gemma, out_dtype=out_dtype), total
    if out_dtype is not None and out_dtype != x.dtype:
        return rms_norm_reference(x, weight, eps, gemma=gemma).to(out_dtype)
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    h = x.to(compute)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.to(compute))).to(dtype)
    return weight * h.to(dtype)


# ------------------------------------------------------------------------------------------------------- rotary


def rotary(q, k, cos, sin):
    """Rotary embedding of q [T, Hq, D] and k [T, Hkv, D] with cos / sin [T, D] (already gathered at each token's
    position): returns new (q, k), contiguous [T, H, D] in q's dtype. cos / sin have q's dtype (PyTorch's
    roundings) or are float32 beside bf16 q / k (the mixed mode: fp32 products, one rounding)."""
    q_out, k_out = _alloc(q.shape, q), _alloc(k.shape, k)
    torch.ops.llm2vec_fast.rotary(q, k, cos, sin, q_out, k_out)
    return q_out, k_out


def rotary_reference(q, k, cos, sin):
    """apply_rotary_pos_emb of Hugging Face Llama, in the [T, H, D] layout (fp32 cos / sin beside bf16 q / k:
    computed in fp32, rounded to q's dtype once)."""
    if cos.dtype != q.dtype:
        out = rotary_reference(q.to(cos.dtype), k.to(cos.dtype), cos, sin)
        return out[0].to(q.dtype), out[1].to(k.dtype)
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ------------------------------------------------------------------------------------------------------- SwiGLU


def silu_mul(gate, up, round_act: bool = True):
    """silu(gate) * up for gate / up [..., I] (row strides may differ: halves of one fused projection).
    round_act: round silu(gate) to the storage dtype before the product, as PyTorch's two ops do; False keeps it
    in fp32 so that only the product is rounded (the mixed-precision mode)."""
    shape = gate.shape
    g2, u2 = _rows(gate), _rows(up)
    out = _alloc(g2.shape, gate)
    torch.ops.llm2vec_fast.silu_mul(g2, u2, out, bool(round_act))
    return out.view(shape)


def silu_mul_reference(gate, up, round_act: bool = True):
    """silu(gate) * up in plain PyTorch, the reference for `silu_mul`; gate, up [..., I]."""
    if not round_act:
        compute = torch.promote_types(gate.dtype, torch.float32)
        return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------- varlen attention


def varlen_attention(q, k, v, cu_seqlens, softmax_scale=None, fp32_probs: bool = False, kernel=None, *,
                     causal: bool = False, window=None, softcap=None):
    """Attention within each packed sequence: q [T, Hq, D], k / v [T, Hkv, D] (GQA: Hq a multiple of Hkv),
    cu_seqlens [B+1] cumulative starts (CPU). Returns [T, Hq, D] in q's dtype.

    Masks and caps as Hugging Face's eager attention applies them, each within one sequence: causal, query i sees
    keys j <= i; window (a positive token count, None for none), only keys with |i - j| < window (Gemma 2 / 3 and
    Qwen3 sliding layers: with causal, the keys i - window < j <= i); softcap (positive, None for none), scores s
    become softcap * tanh(s / softcap) after the scale and before masking (Gemma 2). Masked keys get probability 0
    exactly, and the kernels skip the work outside the band. Both kernels take every combination.

    bf16 inputs: the probabilities are rounded to bf16 before P @ V, as torch's CPU flash attention does, unless
    fp32_probs, which keeps them to about 16 bits (P split into two bf16 halves, two passes; the mixed mode uses it).
    kernel: "brgemm" (oneDNN's micro-GEMMs), "portable" (the plain C++ kernel, fp32 P) or "auto" (brgemm where this
    CPU has it for the dtype); None takes the setting LLM2VEC_FAST_CPU_ATTENTION (`llm2vec_fast.backends` passes
    the kernel it chose)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = _alloc(q.shape, q)
    torch.ops.llm2vec_fast.varlen_attention(q, k, v, cu_seqlens, float(scale), out, bool(fp32_probs),
                                            kernel or settings.current().cpu_attention, bool(causal),
                                            _window(window), _softcap(softcap))
    return out


def _window(window) -> int:
    """The op's window argument: 0 for None, else a positive int (a window of 0 tokens would see nothing)."""
    if window is None:
        return 0
    try:
        value = operator.index(window) if not isinstance(window, bool) else 0
    except TypeError:
        value = 0
    if value < 1:
        raise ValueError(f"window must be a positive number of tokens, or None for no sliding window; got {window!r}")
    return value


def _softcap(softcap) -> float:
    """The op's softcap argument: 0.0 for None, else a positive finite float."""
    if softcap is None:
        return 0.0
    try:
        value = float(softcap)
    except (TypeError, ValueError):
        value = 0.0
    if not 0.0 < value < math.inf:
        raise ValueError(f"softcap must be a positive number, or None for no logit softcapping; got {softcap!r}")
    return value
