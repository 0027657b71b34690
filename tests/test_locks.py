"""The locks and pyproject.toml's ranges agree: installs reproduce what CI tested.

constraints/latest.txt (the newest stack) and constraints/minimum.txt (the oldest stack we claim) are what
`make lock` wrote after the suite passed on them. Each dependency's lower bound in pyproject.toml is the oldest
version of it in the two locks, and its upper bound the next major release after the newest one; the install
commands of the Makefile and CI go through the locks.
"""

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from repo_root import REPO

LOCKS = ("latest", "minimum")


def read_lock(name: str) -> dict:
    pins = {}
    for line in (REPO / "constraints" / f"{name}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            package, _, version = line.partition("==")
            assert version, f"constraints/{name}.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(package)] = Version(version)
    return pins


def declared_requirements() -> list:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        requirements += [Requirement(r) for r in extra]
    return [r for r in requirements if canonicalize_name(r.name) != "llm2vec-fast"]


@pytest.fixture(scope="module")
def locks() -> dict:
    return {name: read_lock(name) for name in LOCKS}


def test_locks_pin_the_stacks_they_claim(locks):
    latest, minimum = locks["latest"], locks["minimum"]
    for package, version in {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}.items():
        assert minimum[package] == Version(version), package
    assert minimum["numpy"].release[:2] == (2, 5)
    # numpy is the exception: 2.5 needs Python 3.12, so the Python 3.11 lock holds the newest 2.4.
    for package in ("torch", "triton", "transformers", "sentence-transformers", "kernels"):
        assert latest[package] >= minimum[package], package
    assert "llm2vec-fast" not in latest and "llm2vec-fast" not in minimum


def test_lower_bounds_are_the_oldest_tested_and_upper_bounds_the_next_major(locks):
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        upper = [Version(s.version) for s in requirement.specifier if s.operator == "<"]
        assert len(lower) == 1, f"{requirement}: needs one lower bound"
        tested = [lock[name] for lock in locks.values() if name in lock]
        if not tested:  # an extra no lock installs (mteb, matplotlib of the eval extra)
            continue
        assert lower[0] == min(tested), f"{requirement}: the oldest tested is {min(tested)}"
        assert upper == [Version(f"{max(tested).major + 1}")], f"{requirement}: the next major is <{max(tested).major + 1}"


def test_installs_go_through_the_locks():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^LOCK \?= constraints/latest\.txt$", makefile, re.M)
    installs = [line for line in makefile.splitlines() if line.startswith("\t$(PIP) ")]
    assert len(installs) == 4 and all(" -c $(LOCK) " in line for line in installs), installs
    assert "make test-minimum" in (REPO / ".ci" / "run").read_text()
    assert "make test\n" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "pip install -c constraints/latest.txt" in readme
