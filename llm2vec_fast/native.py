"""Loading the C++ CPU ops (``csrc/``), once per process, never raising.

`load()` returns the loaded library (its ops are then ``torch.ops.llm2vec_fast.*``) or None. It takes, in order:
the extension that ``setup.py`` built (``LLM2VEC_FAST_BUILD_CPP=1``, module ``llm2vec_fast._C``), else a JIT build
of ``llm2vec_fast/csrc/*.cpp`` (`CSRC`) with ninja into a cached build directory, ``<cache>/build/<key>`` (cache as
for the default model: ``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec_fast``). The key (`build_key`) hashes what the
library depends on: the sources' content, the compiler's version, the torch version and ABI, the flags and the
CPU, and nothing else, so that a reinstall (another path, new file times) reuses the build. A finished build
leaves a record (`RECORD`) beside the library, and a directory with one is loaded without running ninja at all
(ninja would rebuild for a new source path or a newer source file time). A build takes ~30 s and says so on
stderr, with the time it took; a cached load prints nothing. Without a compiler, ninja or the sources, or on a
build error, it warns once and returns None, and every caller keeps the PyTorch path.
``LLM2VEC_FAST_NATIVE=0`` disables the native ops without a warning.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
import warnings

import torch

from . import settings

ENV_SWITCH = "LLM2VEC_FAST_NATIVE"
LIBRARY_NAME = "llm2vec_fast_native"
# Written into the build directory once its library is built: {"library": file name, "key": what was hashed}.
RECORD = "build.json"
# The files of CSRC a build depends on (csrc/README.md is not one: editing it must not rebuild).
SOURCE_SUFFIXES = (".cpp", ".cc", ".h", ".hpp")


# The C++ sources: the repository's csrc/, seen through the llm2vec_fast/csrc link in a checkout and shipped as
# real files at the same place in the wheel.
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# -ffp-contract=off keeps a*b + c*d two roundings, as in PyTorch (see csrc/cpu_ops.cpp); -march=native is why the
# build key includes the CPU.
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


def build_seconds() -> float:
    """Seconds this process spent compiling the C++ ops (0.0 when it loaded a cached build or none)."""
    return _state.get("build_seconds", 0.0)


def source_files(directory: str | None = None) -> list[str]:
    """The C++ files of `directory` (default CSRC) that a build depends on, sorted."""
    directory = CSRC if directory is None else directory
    return sorted(path for path in glob.glob(os.path.join(directory, "*")) if path.endswith(SOURCE_SUFFIXES))


def build_key(sources: list[str] | None = None, compiler: str | None = None) -> dict:
    """What the JIT-built library depends on, and nothing else: {"sources": sha256 of every source's name and
    content, "compiler": its --version line, "torch", "cxx11_abi", "cflags", "ldflags", "cpu"}. Paths and file
    times are left out on purpose: a reinstall into another directory must find the same build."""
    digest = hashlib.sha256()
    for path in sorted(source_files() if sources is None else sources, key=os.path.basename):
        with open(path, "rb") as f:
            content = f.read()
        digest.update(f"{os.path.basename(path)}\0{len(content)}\0".encode())
        digest.update(content)
    return {"sources": digest.hexdigest(), "compiler": compiler_version(compiler), "torch": torch.__version__,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "cflags": list(CFLAGS), "ldflags": list(LDFLAGS),
            "cpu": _cpu_tag()}


def build_directory(key: dict | None = None) -> str:
    """The JIT build's cached directory for `key` (default: `build_key()` of CSRC): ``<cache>/build/<hash>``,
    named by the torch version and a hash of the whole key, so that one directory holds one build."""
    key = build_key() if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(settings.current().cache_dir, "build", f"torch{key['torch'].replace('+', '_')}-{digest}")


def compiler_command() -> str:
    """The C++ compiler torch's JIT build runs: $CXX, else c++ (as torch.utils.cpp_extension chooses on Linux)."""
    return os.environ.get("CXX", "c++")


@functools.lru_cache(maxsize=None)
def compiler_version(compiler: str | None = None) -> str:
    """The first line of `compiler --version` (default: `compiler_command()`), or "unavailable (...)" when it
    cannot run: a compiler upgrade changes the code it emits, so it is part of the build key."""
    command = compiler or compiler_command()
    try:
        result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable ({command}: {type(error).__name__})"
    lines = result.stdout.strip().splitlines()
    return f"{command}: {lines[0] if lines else 'no version'}"


def _load():
    try:
        return importlib.import_module("llm2vec_fast._C"), "setup.py"
    except ImportError:
        pass
    sources = source_files()
    if not sources:
        return _unavailable(f"no C++ sources found in {CSRC}")
    try:
        key = build_key(sources)
        directory = build_directory(key)
        cached = _cached_library(directory, key)
        if cached is not None:
            try:
                return _load_library(cached), directory
            except (OSError, RuntimeError):
                pass  # a damaged library file: build it again
        return _build(sources, directory, key), directory
    except Exception as error:  # no compiler, no ninja, a compile error, a read-only cache: all fall back
        lines = str(error).strip().splitlines() or [""]
        # A build error's first line is the compiler command; the compiler's own "error:" line says more.
        detail = next((line for line in lines if "error:" in line.lower()), lines[0])
        return _unavailable(f"{type(error).__name__}: {detail.strip()[:300]}")


def _cached_library(directory: str, key: dict) -> str | None:
    """The library a finished build left in `directory` for `key`, or None (never built, or interrupted)."""
    try:
        with open(os.path.join(directory, RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("library"), str):
        return None
    path = os.path.join(directory, os.path.basename(record["library"]))
    return path if os.path.isfile(path) else None


def _load_library(path: str) -> str:
    """Load a built library's ops into torch.ops (what torch's JIT load does once its build is done)."""
    torch.ops.load_library(path)
    return path


def _build(sources: list[str], directory: str, key: dict):
    """Compile `sources` into `directory` (torch's JIT build: ninja, with its own lock against a concurrent build
    of the same directory), say so on stderr with the time it took, and record the finished build."""
    from torch.utils.cpp_extension import load as load_extension, verify_ninja_availability

    verify_ninja_availability()
    os.makedirs(directory, exist_ok=True)
    # Otherwise the first encode would sit silent for half a minute, looking hung.
    print(f"llm2vec-fast: building the C++ CPU ops (once, ~30 s) into {directory} ...", end="", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    try:
        # Copies: torch appends its own flags (its library path among them) to the lists it is given.
        library = load_extension(name=LIBRARY_NAME, sources=sources, build_directory=directory,
                                 extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), is_python_module=False,
                                 verbose=False)
    except BaseException:
        print(" failed", file=sys.stderr, flush=True)
        raise
    seconds = time.perf_counter() - started
    _state["build_seconds"] = _state.get("build_seconds", 0.0) + seconds
    print(f" done in {seconds:.0f} s", file=sys.stderr, flush=True)
    _write_record(directory, library, key)
    return library


def _write_record(directory: str, library, key: dict) -> None:
    """Record the finished build (atomically: a reader sees no record or a whole one). torch's JIT load returns
    the library's path; anything else (an older torch) names the default file."""
    name = os.path.basename(library) if isinstance(library, str) else f"{LIBRARY_NAME}.so"
    temporary = os.path.join(directory, f".{RECORD}.{os.getpid()}")
    try:
        with open(temporary, "w") as f:
            json.dump({"library": name, "key": key}, f, indent=1, sort_keys=True)
        os.replace(temporary, os.path.join(directory, RECORD))
    except OSError:
        pass  # a read-only cache: the next process builds (ninja finds it up to date) and loads as before


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
