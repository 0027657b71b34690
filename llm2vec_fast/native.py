"""Loading the C++ CPU ops (``csrc/``), once per process, never raising.

`load()` returns the loaded library (its ops are then ``torch.ops.llm2vec_fast.*``) or None. It takes, in order:
the extension that ``setup.py`` built (``LLM2VEC_FAST_BUILD_CPP=1``, module ``llm2vec_fast._C``), else a JIT build
of ``llm2vec_fast/csrc/*.cpp`` (`CSRC`) with ninja into a cached build directory, ``<cache>/build/<key>`` (cache as
for the default model: ``$LLM2VEC_FAST_CACHE`` or ``~/.cache/llm2vec_fast``). The key (`build_key`) hashes what the
library depends on: the sources' content, the compiler's version, the torch version and ABI, the flags and the
CPU, and nothing else, so that a reinstall (another path, new file times) reuses the build. A build takes ~30 s and
says so on stderr, with the time it took; a cached load prints nothing. Without a compiler, ninja or the sources,
or on a build error, it warns once and returns None, and every caller keeps the PyTorch path.
``LLM2VEC_FAST_NATIVE=0`` disables the native ops without a warning.

The cache is code we run, so it is not trusted blindly:

- The cache directory, ``<cache>/build`` and the build directory must belong to this user and be writable by no
  one else (``mode & 0o022 == 0``; the first two may be links to such directories, the build directory is no
  link). Otherwise nothing is loaded or
  built there: `load()` warns once, naming the directory, the problem and the fix (``chmod go-w DIR``, or a
  private ``LLM2VEC_FAST_CACHE``), and returns None. Directories created here get mode 0o700.
- A finished build leaves a record (`RECORD`, written atomically by the build) beside the library: its file name,
  its sha256 and the key. A directory whose record matches is loaded without running ninja (ninja would rebuild
  for a new source path or a newer source file time); before the library is loaded its file must be a regular
  file (not a link), this user's, writable by no one else, with the recorded sha256. Anything else (a replaced
  library, a build folder copied into the cache without a record, an interrupted build) is discarded, the whole
  directory with it, and built again, saying why on stderr; if that build fails, the warning names both.
- Builds of one directory take turns under an ``fcntl.flock`` on ``<build dir>.lock`` (the holder's PID is
  written into it for messages); the kernel releases a flock when its holder dies, so it never goes stale. Under
  it, a torch JIT ``lock`` file (torch's FileBaton, which a killed build leaves behind and on which every later
  build would wait forever) can only be stale, and is removed with the untrusted directory. A build still held
  by a live process after `BUILD_WAIT_SECONDS` falls back to PyTorch with a warning naming that process.

These checks keep other users out of the cache; a process running as this user could rewrite the record too, but
it can run code as this user anyway.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import threading
import time
import warnings

try:
    import fcntl
except ImportError:  # not POSIX: the cache's checks cannot run, so there is no JIT build (see _load)
    fcntl = None

import torch

from . import settings

ENV_SWITCH = "LLM2VEC_FAST_NATIVE"
LIBRARY_NAME = "llm2vec_fast_native"
# Written into the build directory once its library is built: {"library": file name, "sha256": the library's
# hash, "key": what was hashed}.
RECORD = "build.json"
# torch's JIT build lock (torch.utils.file_baton.FileBaton) inside the build directory.
TORCH_LOCK = "lock"
# How long a load waits for another process's build of the same directory before it falls back to PyTorch.
BUILD_WAIT_SECONDS = 600.0
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


class CacheRefused(Exception):
    """The build cache is not safe to run code from (see the module docstring); the message names the directory,
    the problem and the fix."""


def _load():
    try:
        return importlib.import_module("llm2vec_fast._C"), "setup.py"
    except ImportError:
        pass
    sources = source_files()
    if not sources:
        return _unavailable(f"no C++ sources found in {CSRC}")
    distrust = None
    try:
        if fcntl is None or not hasattr(os, "geteuid"):
            raise CacheRefused("the JIT build cache's ownership checks and build lock need a POSIX system")
        key = build_key(sources)
        directory = build_directory(key)
        _private_cache(directory)
        cached, distrust = _trusted_library(directory, key)
        if cached is not None:
            try:
                return _load_library(cached), directory
            except (OSError, RuntimeError) as error:  # a damaged library file: build it again
                distrust = f"its library failed to load ({type(error).__name__})"
        with _build_lock(directory):
            if cached is None:  # another process may have finished the build while this one waited for the lock
                cached, distrust = _trusted_library(directory, key)
                if cached is not None:
                    return _load_library(cached), directory
            _discard(directory, distrust)
            return _build(sources, directory, key), directory
    except CacheRefused as refused:
        return _unavailable(str(refused))
    except Exception as error:  # no compiler, no ninja, a compile error, a read-only cache: all fall back
        lines = str(error).strip().splitlines() or [""]
        # A build error's first line is the compiler command; the compiler's own "error:" line says more.
        detail = next((line for line in lines if "error:" in line.lower()), lines[0])
        reason = f"{type(error).__name__}: {detail.strip()[:300]}"
        if distrust:
            reason = f"the cached build was not trusted ({distrust}) and rebuilding it failed: {reason}"
        return _unavailable(reason)


def _private_cache(directory: str) -> None:
    """Create (mode 0o700) and check the cache directory, its ``build`` folder and the build `directory`: each
    must be a directory of this user that no one else can write; raise CacheRefused naming the one that is not."""
    build_root = os.path.dirname(directory)
    cache = os.path.dirname(build_root)
    parent = os.path.dirname(os.path.abspath(cache))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    # The cache directory and its build folder may be links (~/.cache on another disk; tests/test_docs.py links
    # its cache's build folder to the suite's): only this user can place a link in a private folder, and the
    # target is what is checked. The build directory, which is emptied and rebuilt here, must be a real one.
    _private_directory(cache, "cache directory", follow=True)
    _private_directory(build_root, "build folder", follow=True)
    _private_directory(directory, "build directory", follow=False)


def _private_directory(path: str, what: str, *, follow: bool) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.stat(path) if follow else os.lstat(path)
    private = "set LLM2VEC_FAST_CACHE to a private directory of your own"
    if stat.S_ISLNK(info.st_mode):
        raise CacheRefused(f"the {what} {path} is a symbolic link; refusing to load or build code there: remove "
                           f"the link, or {private}")
    if not stat.S_ISDIR(info.st_mode):
        raise CacheRefused(f"the {what} {path} is not a directory: remove it, or {private}")
    if info.st_uid != os.geteuid():
        raise CacheRefused(f"the {what} {path} belongs to user id {info.st_uid}, not to this user "
                           f"({os.geteuid()}); refusing to load or build code there: {private}")
    if info.st_mode & 0o022:
        raise CacheRefused(f"the {what} {path} is writable by group or others (mode "
                           f"{stat.S_IMODE(info.st_mode):o}); refusing to load or build code there: run "
                           f"`chmod go-w {path}`, or {private}")


def _trusted_library(directory: str, key: dict) -> tuple[str | None, str | None]:
    """(the library a finished build left in `directory` for `key`, None) when its record is whole and the file
    matches it; else (None, why not), or (None, None) for a directory that holds nothing (never built)."""
    try:
        with open(os.path.join(directory, RECORD)) as f:
            record = json.load(f)
    except FileNotFoundError:
        try:
            entries = os.listdir(directory)
        except OSError:
            entries = []
        if not entries:
            return None, None
        if TORCH_LOCK in entries:
            return None, f"no build record, and a stale torch build lock {os.path.join(directory, TORCH_LOCK)} " \
                         f"left by an interrupted build"
        return None, "it holds files but no build record (an interrupted build, or a build folder copied in)"
    except (OSError, ValueError) as error:
        return None, f"its build record is unreadable ({type(error).__name__})"
    if not isinstance(record, dict) or not isinstance(record.get("library"), str):
        return None, "its build record is malformed"
    if record.get("key") != key:
        return None, "its build record is for another build key"
    recorded = record.get("sha256")
    if not isinstance(recorded, str):
        return None, "its build record has no library hash (an older or copied build)"
    path = os.path.join(directory, os.path.basename(record["library"]))
    try:
        actual = _library_sha256(path)
    except (OSError, CacheRefused) as error:
        return None, f"its library {path} cannot be checked: {error}"
    if actual != recorded:
        return None, f"its library {path} is not the one built there (sha256 {actual[:16]}..., recorded " \
                     f"{recorded[:16]}...: the file was replaced)"
    return path, None


def _library_sha256(path: str) -> str:
    """The sha256 of the library file `path`, which must be a regular file (a link is refused, not followed) of
    this user that no one else can write."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CacheRefused("not a regular file")
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise CacheRefused(f"owned by user id {info.st_uid} with mode {stat.S_IMODE(info.st_mode):o}")
        digest = hashlib.sha256()
        with os.fdopen(fd, "rb", closefd=False) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    finally:
        os.close(fd)


@contextlib.contextmanager
def _build_lock(directory: str):
    """Hold the flock on ``<directory>.lock`` (taking turns with other processes building `directory`; the PID
    of the holder is written into it). A holder that keeps it past BUILD_WAIT_SECONDS raises TimeoutError."""
    path = directory + ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                     0o600)
    except OSError as error:
        raise CacheRefused(f"the build lock {path} cannot be opened ({error}); remove it if it is a link, or set "
                           f"LLM2VEC_FAST_CACHE to a private directory of your own") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise CacheRefused(f"the build lock {path} is not a file of this user: remove it, or set "
                               f"LLM2VEC_FAST_CACHE to a private directory of your own")
        deadline, waiting = time.monotonic() + BUILD_WAIT_SECONDS, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"process {holder} has held the build lock {path} for over "
                                       f"{BUILD_WAIT_SECONDS:.0f} s") from None
                if not waiting:
                    waiting = True
                    print(f"llm2vec-fast: waiting for process {holder}, which is building the C++ CPU ops in "
                          f"{directory} ...", file=sys.stderr, flush=True)
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (unlinking a lock file races with its next taker)


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return "?"


def _discard(directory: str, why: str | None) -> None:
    """Empty the build directory before a build (under the build lock): whatever is there was not built and
    recorded here, or is a torch lock left by an interrupted build, and ninja must not reuse any of it."""
    if not os.listdir(directory):
        return
    print(f"llm2vec-fast: discarding the cached build in {directory}: {why or 'not a finished build'}",
          file=sys.stderr, flush=True)
    shutil.rmtree(directory)
    _private_directory(directory, "build directory", follow=False)


def _load_library(path: str) -> str:
    """Load a built library's ops into torch.ops (what torch's JIT load does once its build is done)."""
    torch.ops.load_library(path)
    return path


def _build(sources: list[str], directory: str, key: dict):
    """Compile `sources` into the empty `directory` (torch's JIT build with ninja; the caller holds the build
    lock), say so on stderr with the time it took, and record the finished build."""
    from torch.utils.cpp_extension import load as load_extension, verify_ninja_availability

    verify_ninja_availability()
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
    """Record the finished build with its library's sha256 (atomically: a reader sees no record or a whole one).
    torch's JIT load returns the library's path; anything else (an older torch) names the default file. The
    library loses any group / other write bit (a umask of 002) so that the next load trusts it."""
    name = os.path.basename(library) if isinstance(library, str) else f"{LIBRARY_NAME}.so"
    path = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{RECORD}.{os.getpid()}")
    try:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_mode & 0o022:
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)
        record = {"library": name, "sha256": _library_sha256(path), "key": key}
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(directory, RECORD))
    except (OSError, CacheRefused):
        with contextlib.suppress(OSError):
            os.remove(temporary)
        # A read-only cache: the next process finds no record and builds again.


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
