"""Which implementation runs each op: one ordered table per op, one dispatch, the choice logged once.

For every op the runtime routes (attention, pooling, RMSNorm, rotary embedding, the gated MLP), `TABLE` lists its
implementations in order of preference. Each declares the device it serves, `is_available()` (is it built and
allowed by the settings: the variable in `setting` turns it off or forces it) and `eligible(*tensors)` (can it
take this call: dtype, device, no gradient to track). `choose(op, *tensors)` returns the first implementation that
is available and eligible and logs, once per op and implementation, which one ran; `describe()` is the table
`llm2vec-fast env` prints. A reader finds "why did this op run on that path" here.

The C++ ops (csrc/) are inference-only CPU kernels: they are eligible for CPU float32 / bfloat16 inputs that need
no gradient. A model uses them only after `cpu_runtime.use_native_cpu_ops` swapped them into its modules (encode does
that on CPU); the per-call choice between them and PyTorch is made here.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from . import native, settings

logger = logging.getLogger(__name__)

NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_eligible(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """CPU, float32 / bfloat16, one dtype, and nothing that autograd would have to differentiate."""
    if x.device.type != "cpu" or x.dtype not in NATIVE_DTYPES:
        return False
    if any(o.dtype != x.dtype for o in others):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others)))


def block_eligible(x: torch.Tensor, weight: torch.Tensor, matmul_dtype=None) -> bool:
    """native_eligible for a block (an MLP, an attention block) whose input may already be in its prepared GEMMs'
    dtype `matmul_dtype` (the mixed mode hands bf16 norm outputs to blocks with fp32 weights)."""
    if matmul_dtype is None or x.dtype != matmul_dtype or x.device.type != "cpu":
        return native_eligible(x, weight)
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def _on_cuda(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def _always(*tensors: torch.Tensor) -> bool:
    return True


def _triton_installed() -> bool:
    from .kernels._triton import HAS_TRITON

    return HAS_TRITON


def _native_op(name: str) -> Callable[[], bool]:
    return lambda: native.has_op(name)


def _brgemm_available() -> bool:
    return native.has_op("brgemm_attention_available") and settings.current().cpu_attention != "portable"


def _brgemm_eligible(q: torch.Tensor, *others: torch.Tensor) -> bool:
    return native_eligible(q, *others) and torch.ops.llm2vec_fast.brgemm_attention_available(q.dtype)


def _portable_available() -> bool:
    return native.has_op("varlen_attention") and settings.current().cpu_attention != "brgemm"


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    device: str  # "cuda", "cpu" or "any"
    setting: str  # the variable that switches it off or forces it ("" for none)
    is_available: Callable[[], bool]
    eligible: Callable[..., bool]


_TORCH = Implementation("torch", "any", "", lambda: True, _always)

TABLE: dict[str, tuple[Implementation, ...]] = {
    # Causality, sliding windows and logit softcapping do not enter the choice: both C++ kernels take every
    # combination (csrc/cpu_ops.cpp, tests/test_native_attention_masks.py), so the call's tensors decide alone.
    "attention": (
        Implementation("triton", "cuda", "", _triton_installed, _on_cuda),
        Implementation("cpp-brgemm", "cpu", "LLM2VEC_FAST_NATIVE, LLM2VEC_FAST_CPU_ATTENTION", _brgemm_available,
                       _brgemm_eligible),
        Implementation("cpp-portable", "cpu", "LLM2VEC_FAST_NATIVE, LLM2VEC_FAST_CPU_ATTENTION",
                       _portable_available, native_eligible),
        _TORCH,
    ),
    "attention_block": (  # q/k/v, rotary, attention and o_proj of a packed CPU encode in one swapped forward
        Implementation("cpp", "cpu", "LLM2VEC_FAST_NATIVE", _native_op("rotary"), block_eligible),
        _TORCH,
    ),
    "pooling": (
        Implementation("triton", "cuda", "", _triton_installed, _on_cuda),
        _TORCH,
    ),
    "rms_norm": (
        Implementation("cpp", "cpu", "LLM2VEC_FAST_NATIVE", _native_op("rms_norm"), native_eligible),
        _TORCH,
    ),
    "rotary": (
        Implementation("cpp", "cpu", "LLM2VEC_FAST_NATIVE", _native_op("rotary"), native_eligible),
        _TORCH,
    ),
    "mlp": (
        Implementation("cpp", "cpu", "LLM2VEC_FAST_NATIVE", _native_op("silu_mul"), block_eligible),
        _TORCH,
    ),
}

_logged: set = set()


def choose(op: str, *tensors) -> Implementation:
    """The first implementation of `op` (a key of TABLE) that is available and eligible for these tensors (the
    call's inputs, the first one deciding the device; a block's eligibility also takes its GEMMs' dtype); logs the
    choice the first time it is made."""
    for implementation in TABLE[op]:
        if implementation.is_available() and implementation.eligible(*tensors):
            key = (op, implementation.name)
            if key not in _logged:
                _logged.add(key)
                logger.info("llm2vec-fast: %s runs on %s (%s)", op, implementation.name,
                            ", ".join(f"{t.device.type} {str(t.dtype).replace('torch.', '')}" for t in tensors[:1]))
            return implementation
    raise AssertionError(f"no implementation of {op} took the call")  # torch takes every call


def describe() -> list[dict]:
    """One row per (op, implementation), in dispatch order: its device, whether it is available here, and the
    setting that steers it. What `llm2vec-fast env` prints."""
    return [dict(op=op, implementation=impl.name, device=impl.device, available=impl.is_available(),
                 setting=impl.setting or "-") for op, implementations in TABLE.items() for impl in implementations]
