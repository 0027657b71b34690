"""Shared helpers of the kernel tests: NaN-poisoned outputs and the tolerance rule."""

import pytest
import torch

# These tests run the Triton kernels (in its interpreter on CPU). Triton comes with the gpu extra, which the test
# extra includes; a lean CPU install without it skips this folder rather than failing in every test.
pytest.importorskip("triton", reason="the kernel tests need Triton: pip install 'llm2vec-fast[gpu]'")

from llm2vec_fast.kernels import attention, fused_linear_cross_entropy, pooling  # noqa: E402

# Absolute floors on top of "2x the error of the same-precision PyTorch computation". fp32: ~8 ulp at the O(1)
# magnitudes used, room for a different summation order (online softmax, blocked sums). fp16: a tenth of an ulp
# at 1, for elements where the same-precision reference happens to be exact.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16"}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element no kernel writes fails the comparison."""
    monkeypatch.setattr(attention, "POISON_OUTPUTS", True)
    monkeypatch.setattr(pooling, "POISON_OUTPUTS", True)
    monkeypatch.setattr(fused_linear_cross_entropy, "POISON_OUTPUTS", True)


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
