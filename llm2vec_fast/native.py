"""Loading the C++ CPU ops (``csrc/``), once per process, never raising.

`load()` returns the loaded library (its ops are then ``torch.ops.llm2vec_fast.*``) or None. It takes, in order:
the extension that ``setup.py`` built (``LLM2VEC_FAST_BUILD_CPP=1``, module ``llm2vec_fast._C``), else a JIT build
of ``llm2vec_fast/csrc/*.cpp`` (`CSRC`) with ninja into a cached build
directory (``<cache>/build/<torch>-<cpu>``, cache as for the default model: ``$LLM2VEC_FAST_CACHE`` or
``~/.cache/llm2vec_fast``; ~30 s cold, instant afterwards, rebuilt when a source changes; a build announces itself
in one line on stderr, a cached load prints nothing). Without a compiler, ninja or the sources, or on a build
error, it warns once and returns None, and every caller keeps the PyTorch path.
``LLM2VEC_FAST_NATIVE=0`` disables the native ops without a warning.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os
import platform
import sys
import threading
import warnings

import torch

from . import settings

ENV_SWITCH = "LLM2VEC_FAST_NATIVE"
LIBRARY_NAME = "llm2vec_fast_native"


# The C++ sources: the repository's csrc/, seen through the llm2vec_fast/csrc link in a checkout and shipped as
# real files at the same place in the wheel.
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# -ffp-contract=off keeps a*b + c*d two roundings, as in PyTorch (see csrc/cpu_ops.cpp); -march=native is why the
# build directory is keyed on the CPU.
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def enabled() -> bool:
    """False when the user switched the native ops off (LLM2VEC_FAST_NATIVE=0, see `settings`)."""
    return settings.current().native


def load():
    """The native op library, or None (disabled, or it cannot be built here; the reason is warned once)."""
    if not enabled():
        return None
    with _lock:
        if "library" not in _state:
            _state["library"], _state["source"] = _load()
        return _state["library"]


def source() -> str | None:
    """Where the loaded ops came from: "setup.py" or the JIT build directory; None when not loaded."""
    load()
    return _state.get("source")


def has_op(name: str) -> bool:
    """True when the native library is loaded and has the op ``torch.ops.llm2vec_fast.<name>``."""
    return load() is not None and hasattr(torch.ops.llm2vec_fast, name)


def build_directory() -> str:
    """The JIT build's cached directory, keyed on the torch version and the CPU: ``<cache>/build/torch<v>-<cpu>``."""
    return os.path.join(settings.current().cache_dir, "build", f"torch{torch.__version__.replace('+', '_')}-{_cpu_tag()}")


def _load():
    try:
        return importlib.import_module("llm2vec_fast._C"), "setup.py"
    except ImportError:
        pass
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    if not sources:
        return _unavailable(f"no C++ sources found in {CSRC}")
    try:
        from torch.utils.cpp_extension import load as load_extension, verify_ninja_availability

        verify_ninja_availability()
        directory = build_directory()
        os.makedirs(directory, exist_ok=True)
        if _needs_build(directory, sources):
            # Otherwise the first encode would sit silent for half a minute, looking hung.
            print(f"llm2vec-fast: building the C++ CPU ops (once, ~30 s) into {directory}", file=sys.stderr,
                  flush=True)
        library = load_extension(name=LIBRARY_NAME, sources=sources, build_directory=directory,
                                 extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
        return library, directory
    except Exception as error:  # no compiler, no ninja, a compile error, a read-only cache: all fall back
        lines = str(error).strip().splitlines() or [""]
        # A build error's first line is the compiler command; the compiler's own "error:" line says more.
        detail = next((line for line in lines if "error:" in line.lower()), lines[0])
        return _unavailable(f"{type(error).__name__}: {detail.strip()[:300]}")


def _needs_build(directory: str, sources: list[str]) -> bool:
    """Whether loading will compile: no library built in `directory` yet, or a source newer than the newest one
    (torch then builds a new version of the library, ``<name>_v1.so``, ...)."""
    libraries = glob.glob(os.path.join(directory, f"{LIBRARY_NAME}*.so"))
    if not libraries:
        return True
    built = max(os.path.getmtime(path) for path in libraries)
    return any(os.path.getmtime(path) > built for path in sources)


def _unavailable(reason: str):
    warnings.warn(f"llm2vec_fast: C++ CPU ops unavailable, using the PyTorch path ({reason}). Set "
                  f"{ENV_SWITCH}=0 to silence this.", RuntimeWarning, stacklevel=3)
    return None, None


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line
                    break
    except OSError:
        flags = platform.processor()
    return platform.machine() + "-" + hashlib.sha1(flags.encode()).hexdigest()[:10]
