"""Shared helpers of the kernel tests: NaN-poisoned outputs, GPU-faithful bf16 in the interpreter, tolerances."""

import os

import numpy as np
import pytest
import torch

# These tests run the Triton kernels (in its interpreter on CPU). Triton comes with the gpu extra, which the test
# extra includes; a lean CPU install without it skips this folder rather than failing in every test.
pytest.importorskip("triton", reason="the kernel tests need Triton: pip install 'llm2vec-fast[gpu]'")

import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

# Absolute floors on top of "2x the error of the same-precision PyTorch computation". fp32: ~8 ulp at the O(1)
# magnitudes used, room for a different summation order (online softmax, blocked sums). fp16: a tenth of an ulp
# at 1, for elements where the same-precision reference happens to be exact; bf16 likewise (2^-7 / 10).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 8e-4}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _as_fp32(t):
    """An interpreter tensor handle's data as fp32 numbers (bf16 handles hold the raw 16-bit patterns)."""
    if t.dtype.scalar != tl.bfloat16:
        return t.data
    return interpreter._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32)


def _fp32_to_bf16_bits(x):
    """fp32 numbers -> bf16 bit patterns, rounded to nearest even as the GPU's ``.to(tl.bfloat16)`` rounds."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


@pytest.fixture(autouse=True)
def interpreter_bf16(monkeypatch):
    """Make the interpreter's bf16 match the GPU's. It (triton 3.9) keeps bf16 values as 16-bit integers, and
    (a) its ``tl.dot`` multiplies those integers (errors ~1e9): bf16 operands are upcast to fp32 here, as tensor
    cores take bf16 exactly and accumulate in fp32; (b) its fp32 -> bf16 cast truncates, which doubles the
    rounding error of every stored output and every probability fed to a dot: it rounds to nearest even here.
    Loads and stores are right as they are. Elementwise bf16 arithmetic is wrong too (it runs on the bit patterns,
    errors ~1e22, so it fails loudly), and is left alone: the kernels do none, they compute in fp32 and cast."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    builder = interpreter.InterpreterBuilder
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, *precision_args):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return original_dot(self, a, b, d, *precision_args)
        acc = np.matmul(_as_fp32(a), _as_fp32(b), dtype=d.data.dtype) + d.data
        return interpreter.TensorHandle(acc, d.dtype.scalar)

    def cast_impl(self, src, dst_type):
        if (src.dtype.scalar, dst_type.scalar) != (tl.float32, tl.bfloat16):
            return original_cast(self, src, dst_type)
        return interpreter.TensorHandle(_fp32_to_bf16_bits(src.data), tl.bfloat16)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    monkeypatch.setattr(builder, "cast_impl", cast_impl)


@pytest.fixture(autouse=True)
def poison_outputs(kernel_options):
    """Kernel outputs start as NaN: an element no kernel writes fails the comparison."""
    kernel_options(poison=True)


def assert_close(name, out, ref64, ref_lowp, dtype):
    """out (kernel, test dtype) vs ref64 (float64 ground truth): error <= 2 x error of ref_lowp + floor."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed)"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_lowp.double() - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * base + FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (same-precision torch: {base:.3e})"


@pytest.fixture
def check():
    """The tolerance rule as a fixture (test modules cannot import this conftest by name)."""
    return assert_close
