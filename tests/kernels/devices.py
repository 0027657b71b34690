"""The device the kernel tests run the Triton kernels on.

With a GPU (and Triton's interpreter off) they run compiled on CUDA tensors; without one, tests/conftest.py turns
the interpreter on and they run on CPU tensors. Inputs are drawn on the CPU from seeded generators and then moved,
so both devices check the same numbers against the same float64 references under the same 2x rule. The PyTorch
(CPU) path of each op is tested on CPU tensors on every machine.
"""

import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CPU = torch.device("cpu")


def on(force_triton: bool) -> torch.device:
    """Where a test that runs the Triton path (force_triton=True) or the PyTorch CPU path puts its tensors."""
    return DEVICE if force_triton else CPU


def get_rng_state() -> torch.Tensor:
    """The state of the generator the kernels draw their dropout seed from on DEVICE."""
    return torch.cuda.get_rng_state() if ON_GPU else torch.get_rng_state()


def set_rng_state(state: torch.Tensor) -> None:
    if ON_GPU:
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)
