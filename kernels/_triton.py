"""Triton, when it is installed.

Triton is an optional dependency (the ``gpu`` extra): the CPU paths of every op are plain PyTorch and must import
and run without it. Each op module imports ``triton`` / ``tl`` from here, defines its kernels only under
``if HAS_TRITON:``, and calls `require_triton` before it launches one, so a GPU call without Triton fails with an
error that names the fix instead of a NameError.
"""

from ._common import _interpreting

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False


def _triton_version() -> tuple:
    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2])


def _fix_interpreter_index_on_numpy_2_4() -> None:
    """Make Triton < 3.8's interpreter run on numpy >= 2.4. Its ``tensor.__index__`` (used for a loop bound that is
    a loaded scalar, as in every varlen loop) calls ``int()`` on a one-element array, which numpy 2.4 refuses;
    Triton 3.8 squeezes the array first, and this does the same for the older interpreters. Only the interpreter
    is touched: compiled kernels never call ``__index__``."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if HAS_TRITON and _interpreting() and _triton_version() < (3, 8):
    _fix_interpreter_index_on_numpy_2_4()

INSTALL_HINT = "pip install 'llm2vec-fast[gpu]'"


def require_triton(what: str) -> None:
    """Raise an ImportError naming `what` (the operation that needs a kernel) when Triton is not installed."""
    if not HAS_TRITON:
        raise ImportError(f"{what} runs a Triton kernel, but Triton is not installed; install it with: "
                          f"{INSTALL_HINT} (CPU tensors take the PyTorch path and do not need it)")
