"""The JIT build cache of the C++ CPU ops (llm2vec_fast.native) is code we run, so it is never trusted blindly: a
library is loaded only if the build recorded its sha256 and the file still has it; the cache must be this user's
and writable by no one else; and an interrupted build (a stale torch lock) never wedges a later run.

Most tests replace torch's JIT build and the library loader with stubs (`fake_jit`) that count builds and record the
hash of every file they would have loaded; one test runs a real build, in a subprocess with a timeout.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
import warnings

import pytest

from llm2vec_fast import native

BUILT = b"the library fake_jit built\n"
UNAVAILABLE = "C++ CPU ops unavailable"


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _foreign_library(tmp_path) -> str:
    """Another shared library than the one the build made: a stdlib extension module, copied."""
    found = sorted(glob.glob(os.path.join(sysconfig.get_config_var("DESTSHARED") or "", "*.so")))
    planted = tmp_path / "planted.so"
    if found:
        shutil.copyfile(found[0], planted)
    else:
        planted.write_bytes(b"\x7fELF not the library we built\n")
    return str(planted)


@pytest.fixture
def fake_jit(monkeypatch, tmp_path, set_env):
    """A fresh private cache (LLM2VEC_FAST_CACHE), no setup.py build, torch's JIT build replaced by a stub that
    writes BUILT (and fails as torch would hang when a torch lock is left in the directory), and the loader
    replaced by one that records the sha256 of each file it is asked to load."""
    import torch.utils.cpp_extension as cpp_extension

    jit = types.SimpleNamespace(builds=[], loaded=[], cache=tmp_path / "cache")

    def fake_build(name, sources, build_directory, **kwargs):
        if os.path.exists(os.path.join(build_directory, native.TORCH_LOCK)):
            raise AssertionError("torch's JIT build would wait forever on the lock file left there")
        jit.builds.append(build_directory)
        path = os.path.join(build_directory, f"{name}.so")
        with open(path, "wb") as f:
            f.write(BUILT)
        return path

    def fake_load(path):
        jit.loaded.append(_sha256(path))
        return path

    set_env(LLM2VEC_FAST_CACHE=str(jit.cache))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(native, "_load_library", fake_load)
    monkeypatch.setitem(sys.modules, "llm2vec_fast._C", None)  # no setup.py build: importing it fails

    def new_process():
        monkeypatch.setattr(native, "_state", {})

    jit.new_process = new_process
    return jit


def _library(directory) -> str:
    return os.path.join(directory, f"{native.LIBRARY_NAME}.so")


def _load_quietly():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        library = native.load()
    return library, [str(w.message) for w in caught if UNAVAILABLE in str(w.message)]


def test_a_build_records_the_library_hash(fake_jit):
    directory = native.build_directory()
    assert native.load() == _library(directory)
    with open(os.path.join(directory, native.RECORD)) as f:
        record = json.load(f)
    assert record["sha256"] == _sha256(_library(directory)) == hashlib.sha256(BUILT).hexdigest()
    assert record["library"] == f"{native.LIBRARY_NAME}.so" and record["key"] == native.build_key()


def test_an_intact_cache_loads_without_rebuild(fake_jit, capsys):
    directory = native.build_directory()
    native.load()
    fake_jit.new_process()
    assert native.load() == _library(directory)
    assert fake_jit.builds == [directory] and fake_jit.loaded == [hashlib.sha256(BUILT).hexdigest()]
    assert native.build_seconds() == 0
    assert capsys.readouterr().err.count("building") == 1


def test_a_replaced_library_is_not_loaded_but_rebuilt(fake_jit, tmp_path, capsys):
    directory = native.build_directory()
    native.load()
    planted = _foreign_library(tmp_path)
    shutil.copyfile(planted, _library(directory))
    fake_jit.new_process()
    assert native.load() == _library(directory)
    assert _sha256(planted) not in fake_jit.loaded
    assert len(fake_jit.builds) == 2 and _sha256(_library(directory)) == hashlib.sha256(BUILT).hexdigest()
    err = capsys.readouterr().err
    assert f"discarding the cached build in {directory}" in err and "the file was replaced" in err
    fake_jit.new_process()  # the rebuilt library is trusted again
    assert native.load() == _library(directory) and len(fake_jit.builds) == 2


@pytest.mark.parametrize("record", ["none", "without hash"])
def test_a_seeded_build_folder_without_a_record_is_not_trusted(fake_jit, tmp_path, record, capsys):
    """A build folder copied into the cache (the library, a build.ninja that says it is up to date), with no
    record or an old record that has no hash, is discarded as a whole and built again."""
    directory = native.build_directory()
    os.makedirs(directory, mode=0o700)
    planted = _foreign_library(tmp_path)
    shutil.copyfile(planted, _library(directory))
    open(os.path.join(directory, "build.ninja"), "w").close()
    if record == "without hash":
        with open(os.path.join(directory, native.RECORD), "w") as f:
            json.dump({"library": f"{native.LIBRARY_NAME}.so", "key": native.build_key()}, f)
    assert native.load() == _library(directory)
    assert fake_jit.loaded == [] and fake_jit.builds == [directory]  # the build loads its own library
    assert not os.path.exists(os.path.join(directory, "build.ninja")), "the seeded folder was kept"
    assert _sha256(_library(directory)) == hashlib.sha256(BUILT).hexdigest()
    expected = "no build record" if record == "none" else "no library hash"
    assert expected in capsys.readouterr().err


def test_a_library_link_is_not_followed(fake_jit, tmp_path):
    """A link in place of the library is refused even when its target has the recorded hash."""
    directory = native.build_directory()
    native.load()
    target = tmp_path / "elsewhere.so"
    shutil.copyfile(_library(directory), target)
    os.remove(_library(directory))
    os.symlink(target, _library(directory))
    fake_jit.new_process()
    assert native.load() == _library(directory)
    assert fake_jit.loaded == [] and len(fake_jit.builds) == 2
    assert not os.path.islink(_library(directory))


@pytest.mark.parametrize("which", ["cache", "build", "key"])
def test_a_group_writable_cache_is_refused_with_the_fix(fake_jit, which):
    directory = native.build_directory()
    native.load()
    fake_jit.new_process()
    target = {"cache": str(fake_jit.cache), "build": os.path.dirname(directory), "key": directory}[which]
    os.chmod(target, 0o775)
    library, messages = _load_quietly()
    assert library is None and native.load() is None
    assert len(messages) == 1, messages  # once per process
    assert f"{target} is writable by group or others (mode 775)" in messages[0]
    assert f"chmod go-w {target}" in messages[0] and "LLM2VEC_FAST_CACHE" in messages[0]
    assert fake_jit.loaded == [] and len(fake_jit.builds) == 1  # neither loaded nor built


def test_a_cache_of_another_user_is_refused(fake_jit, monkeypatch):
    fake_jit.cache.mkdir(mode=0o700)
    uid = os.geteuid()
    monkeypatch.setattr(native.os, "geteuid", lambda: uid + 1)
    library, messages = _load_quietly()
    assert library is None and len(messages) == 1
    assert f"{fake_jit.cache} belongs to user id {uid}, not to this user ({uid + 1})" in messages[0]
    assert "LLM2VEC_FAST_CACHE" in messages[0]
    assert fake_jit.builds == [] and fake_jit.loaded == []


def test_a_linked_build_directory_is_refused(fake_jit, tmp_path):
    """The build directory must be a real one; the cache and its build folder may be links to private ones."""
    directory = native.build_directory()
    os.makedirs(os.path.dirname(directory), mode=0o700)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    os.symlink(tmp_path / "elsewhere", directory)
    library, messages = _load_quietly()
    assert library is None and len(messages) == 1
    assert f"{directory} is a symbolic link" in messages[0]
    assert fake_jit.builds == [] and os.listdir(tmp_path / "elsewhere") == []


@pytest.mark.parametrize("mode", [0o700, 0o777])
def test_a_linked_build_folder_is_checked_where_it_points(fake_jit, tmp_path, mode):
    """A build folder linked to another folder (as tests/test_docs.py links its cache's to the suite's) is used
    when that folder is private, and refused when it is writable by others."""
    fake_jit.cache.mkdir(mode=0o700)
    target = tmp_path / "shared_builds"
    target.mkdir()
    os.chmod(target, mode)
    os.symlink(target, fake_jit.cache / "build")
    library, messages = _load_quietly()
    if mode == 0o700:
        assert library is not None and messages == [] and len(fake_jit.builds) == 1
        assert fake_jit.builds[0].startswith(str(fake_jit.cache / "build"))
    else:
        assert library is None and len(messages) == 1 and fake_jit.builds == []
        assert f"{fake_jit.cache / 'build'} is writable by group or others (mode 777)" in messages[0]


@pytest.mark.parametrize("where", ["LLM2VEC_FAST_CACHE", "default"])
def test_a_fresh_cache_is_created_private_and_trusted(fake_jit, set_env, tmp_path, where):
    """A cache created here passes its own checks, even under a umask of 002 (the library the build leaves
    group-writable loses that bit before it is recorded), and the next process loads it without a build."""
    if where == "default":
        set_env(LLM2VEC_FAST_CACHE=None, XDG_CACHE_HOME=str(tmp_path / "xdg"))
        cache = tmp_path / "xdg" / "llm2vec_fast"
    else:
        cache = tmp_path / "new" / "nested" / "cache"
        set_env(LLM2VEC_FAST_CACHE=str(cache))
    previous = os.umask(0o002)
    try:
        directory = native.build_directory()
        assert directory.startswith(str(cache))
        library, messages = _load_quietly()
        assert library == _library(directory) and messages == []
        for path in (cache, cache / "build", directory):
            assert os.stat(path).st_mode & 0o777 == 0o700, path
        assert os.stat(library).st_mode & 0o022 == 0
        fake_jit.new_process()
        assert native.load() == library and len(fake_jit.builds) == 1
    finally:
        os.umask(previous)


def test_a_stale_torch_lock_is_removed_before_the_build(fake_jit, capsys):
    """A build killed by SIGKILL leaves torch's lock file; under our own build lock it can only be stale."""
    directory = native.build_directory()
    os.makedirs(directory, mode=0o700)
    open(os.path.join(directory, native.TORCH_LOCK), "w").close()
    assert native.load() == _library(directory)
    assert fake_jit.builds == [directory]
    assert not os.path.exists(os.path.join(directory, native.TORCH_LOCK))
    assert "stale torch build lock" in capsys.readouterr().err


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
    print("holding", flush=True)
    time.sleep(120)
""")


def test_a_build_held_by_a_live_process_is_waited_for_and_named(fake_jit, monkeypatch, capsys):
    """While another process holds the build lock, a load waits (saying for whom); past BUILD_WAIT_SECONDS it
    falls back to PyTorch naming that process; once the holder is gone (its flock dies with it) the build runs."""
    directory = native.build_directory()
    os.makedirs(os.path.dirname(directory), mode=0o700)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, directory + ".lock"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        monkeypatch.setattr(native, "BUILD_WAIT_SECONDS", 0.5)
        library, messages = _load_quietly()
        assert library is None and len(messages) == 1
        assert f"process {holder.pid} has held the build lock {directory}.lock" in messages[0]
        assert f"waiting for process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    fake_jit.new_process()
    assert native.load() == _library(directory) and fake_jit.builds == [directory]


REAL_LOAD = textwrap.dedent("""
    import json, sys
    sys.modules["llm2vec_fast._C"] = None  # the JIT build, not a setup.py one
    import torch
    from llm2vec_fast import native
    library = native.load()
    print(json.dumps(dict(library=library, seconds=native.build_seconds(),
                          has_op=library is not None and hasattr(torch.ops.llm2vec_fast, "rms_norm"))))
""")


def test_a_stale_torch_lock_does_not_hang_a_real_build(set_env, tmp_path):
    """The real torch JIT build (ninja, torch's FileBaton) into a build directory where a killed build left its
    lock file and a build.ninja: it finishes instead of waiting forever; the next process loads the intact cache
    without building."""
    from torch.utils.cpp_extension import verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError:
        pytest.skip("no ninja: the C++ ops cannot be built here")
    if shutil.which(native.compiler_command()) is None:
        pytest.skip("no C++ compiler: the C++ ops cannot be built here")
    set_env(LLM2VEC_FAST_CACHE=str(tmp_path / "cache"), LLM2VEC_FAST_NATIVE="1")
    directory = native.build_directory()
    os.makedirs(directory, mode=0o700)
    for name in (native.TORCH_LOCK, "build.ninja"):
        open(os.path.join(directory, name), "w").close()

    def run():
        done = subprocess.run([sys.executable, "-c", REAL_LOAD], capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    first, err = run()
    assert first["library"] == _library(directory) and first["has_op"] and first["seconds"] > 0, err
    assert "stale torch build lock" in err and "done in" in err
    with open(os.path.join(directory, native.RECORD)) as f:
        assert json.load(f)["sha256"] == _sha256(_library(directory))
    second, err = run()
    assert second == dict(first, seconds=0.0) and err == ""


def test_an_untrusted_cache_that_cannot_be_rebuilt_falls_back_naming_why(fake_jit, tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    directory = native.build_directory()
    native.load()
    planted = _foreign_library(tmp_path)
    shutil.copyfile(planted, _library(directory))
    fake_jit.new_process()

    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", no_ninja)
    library, messages = _load_quietly()
    assert library is None and native.load() is None and len(messages) == 1
    assert "the cached build was not trusted" in messages[0] and "the file was replaced" in messages[0]
    assert "rebuilding it failed: RuntimeError: Ninja is required" in messages[0]
    assert _sha256(planted) not in fake_jit.loaded


def test_a_recorded_library_that_fails_to_load_is_rebuilt(fake_jit, monkeypatch, capsys):
    directory = native.build_directory()
    native.load()
    fake_jit.new_process()

    def damaged(path):
        raise OSError(f"{path}: invalid ELF header")

    monkeypatch.setattr(native, "_load_library", damaged)
    assert native.load() == _library(directory) and len(fake_jit.builds) == 2
    assert "its library failed to load (OSError)" in capsys.readouterr().err
