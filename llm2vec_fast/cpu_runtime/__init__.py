"""The CPU runtime: the C++ ops of csrc/ and prepared GEMMs swapped into a patched model's modules for CPU inference.

- `runtime.py`: `CpuRuntime`, the one object per model that owns the swaps and what they were set up with;
- `forwards.py`: the swapped forwards (each falls back to the one it replaced for anything but CPU inference);
- `rotary.py`: the process-wide swap of a family's `apply_rotary_pos_emb`, counted per family;
- `swaps.py`: how a forward is swapped and undone, and how a swapped module shows in `print(model)`.

The functions below are the public entry points; `LLM2Vec.encode` calls `CpuRuntime.prepare` on CPU.
"""

from __future__ import annotations

from typing import Optional

from .runtime import FUSED_GROUPS, NATIVE_OPS, SHIPPED_NATIVE_OPS, CpuRuntime, runtime_of

__all__ = ["CpuRuntime", "NATIVE_OPS", "SHIPPED_NATIVE_OPS", "FUSED_GROUPS", "cpu_linears", "native_cpu_ops",
           "prepare_for_cpu_encode", "runtime_of", "swapped_modules", "use_cpu_linears", "use_native_cpu_ops"]


def _decoder(model):
    # modeling imports this package (its attention reads a module's runtime state): import it when called.
    from ..modeling import base_model, check_supported

    check_supported(model.config)
    return base_model(model)


def use_native_cpu_ops(model, enable: bool = True, ops=None) -> tuple:
    """Route `model`'s CPU inference through the C++ ops of csrc/ (or undo that with enable=False), in place.

    ops: which of NATIVE_OPS to use (default SHIPPED_NATIVE_OPS). Returns the ops now in use: empty when disabled,
    when the native library cannot be loaded (`llm2vec_fast.native` warns once why) or LLM2VEC_FAST_NATIVE=0.
    Gemma, Gemma 2 and Gemma 3 keep their GELU-tanh MLP in PyTorch (silu_mul does not apply); their (1 + weight)
    RMSNorm is handled.
    Calling it again with another `ops` replaces the previous choice.
    """
    decoder = _decoder(model)
    return runtime_of(decoder, create=True).use_native_ops(decoder, enable, ops)


def native_cpu_ops(model) -> Optional[tuple]:
    """The native ops `model` uses (empty if none); None when `use_native_cpu_ops` was never called on it."""
    from ..modeling import base_model

    found = runtime_of(base_model(model))
    return None if found is None or found.native_ops is None else tuple(found.native_ops)


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
    decoder = _decoder(model)
    return runtime_of(decoder, create=True).use_prepared_linears(decoder, enable, matmul_dtype, tokens, fuse,
                                                                  backend)


def cpu_linears(model) -> Optional[dict]:
    """The summary `use_cpu_linears` returned for `model` ({} once disabled), or None when it was never called."""
    from ..modeling import base_model

    found = runtime_of(base_model(model))
    return None if found is None else found.linears


def prepare_for_cpu_encode(model, matmul_dtype, tokens: int) -> CpuRuntime:
    """Set up `model`'s runtime for a CPU encode (see `CpuRuntime.prepare`) and return it."""
    decoder = _decoder(model)
    runtime = runtime_of(decoder, create=True)
    runtime.prepare(decoder, matmul_dtype, tokens)
    return runtime


def swapped_modules(model) -> dict:
    """{module name: what runs instead on CPU} for the modules of `model`'s decoder the runtime swapped."""
    from ..modeling import base_model

    return CpuRuntime.swapped(base_model(model))
