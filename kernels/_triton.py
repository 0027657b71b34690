"""Triton, when it is installed.

Triton is an optional dependency (the ``gpu`` extra): the CPU paths of every op are plain PyTorch and must import
and run without it. Each op module imports ``triton`` / ``tl`` from here, defines its kernels only under
``if HAS_TRITON:``, and calls `require_triton` before it launches one, so a GPU call without Triton fails with an
error that names the fix instead of a NameError.
"""

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

INSTALL_HINT = "pip install 'llm2vec-fast[gpu]'"


def require_triton(what: str) -> None:
    """Raise an ImportError naming `what` (the operation that needs a kernel) when Triton is not installed."""
    if not HAS_TRITON:
        raise ImportError(f"{what} runs a Triton kernel, but Triton is not installed; install it with: "
                          f"{INSTALL_HINT} (CPU tensors take the PyTorch path and do not need it)")
