"""Helpers every op module shares: whether Triton's interpreter is on, and how kernel outputs are allocated.

Plain Python and PyTorch, no Triton: the CPU paths import this too.
"""

import os

import torch

# Tests set this to True (the `kernel_options` fixture of tests/conftest.py): outputs are then allocated
# NaN-filled, so an element a kernel never writes fails loudly. One switch for every op module.
POISON_OUTPUTS = False


def _interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1: tests on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _alloc(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output tensor of `shape` for a kernel to fill: uninitialised, or NaN-filled under POISON_OUTPUTS."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
