"""Session-wide test setup.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, i.e. before the kernel modules are
imported, so it is set here, first. On a machine with a GPU the kernels run natively instead.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dtype="auto" (the CLI's and demo's default) resolves by measuring the CPU; tests that compare CLI output with
# float32 API encodes need one fixed answer. tests/test_cpu_linear.py tests the measured choice itself.
os.environ.setdefault("LLM2VEC_FAST_CPU_DTYPE", "float32")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from tiny_models import FAMILIES, build_model_dir  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: uses the embedded SmolLM2-135M model (slow to prepare once)")


@pytest.fixture
def set_env(monkeypatch):
    """The one way tests change llm2vec_fast.settings (and other environment): set_env(NAME=value, OTHER=None)
    sets or (None) removes variables for the test; settings.current() reads them at the next decision."""
    def apply(**variables):
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))

    return apply


@pytest.fixture
def kernel_options(monkeypatch):
    """The one way tests set the kernels' test-and-tuning switches, undone after the test:
    kernel_options(poison=True) allocates op outputs NaN-filled (kernels/_common.py), and
    kernel_options(tiles={...}) overrides the Triton attention's tile choice (kernels/attention.py)."""
    def apply(poison=None, tiles=None):
        if poison is not None:
            from llm2vec_fast.kernels import _common

            monkeypatch.setattr(_common, "POISON_OUTPUTS", poison)
        if tiles is not None:
            from llm2vec_fast.kernels import attention  # Triton: only the kernel tests ask for tiles

            monkeypatch.setattr(attention, "CONFIG_OVERRIDE", tiles)

    return apply


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict:
    """family -> directory of a tiny random model with its tokenizer, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_model_dir(str(root / family), family) for family in FAMILIES}


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dirs) -> str:
    return tiny_model_dirs["llama"]
