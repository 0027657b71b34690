"""llm2vec_fast.backends: one ordered implementation table per op, one dispatch, the choice logged once, and
`llm2vec-fast env` printing it."""

import json
import logging

import pytest
import torch

from llm2vec_fast import backends, native
from llm2vec_fast.cli import main as cli_main

needs_native = pytest.mark.skipif(native.load() is None, reason="the C++ ops cannot be built here")


def qkv(dtype=torch.float32, requires_grad=False):
    return [torch.randn(5, h, 16, dtype=dtype, requires_grad=requires_grad) for h in (4, 2, 2)]


def test_every_op_ends_with_the_torch_path_that_takes_any_call():
    assert set(backends.TABLE) == {"attention", "attention_block", "pooling", "rms_norm", "rotary", "mlp"}
    for implementations in backends.TABLE.values():
        assert implementations[-1].name == "torch" and implementations[-1].eligible(torch.ones(1, dtype=torch.int8))


@needs_native
def test_cpu_attention_takes_a_cpp_kernel_and_the_setting_picks_which(set_env):
    brgemm = torch.ops.llm2vec_fast.brgemm_attention_available(torch.float32)
    set_env(LLM2VEC_FAST_CPU_ATTENTION=None)
    assert backends.choose("attention", *qkv()).name == ("cpp-brgemm" if brgemm else "cpp-portable")
    set_env(LLM2VEC_FAST_CPU_ATTENTION="portable")
    assert backends.choose("attention", *qkv()).name == "cpp-portable"


@needs_native
@pytest.mark.parametrize("why", ["gradient", "float64", "mixed dtypes", "native off"])
def test_calls_the_cpp_ops_cannot_take_go_to_torch(set_env, why):
    tensors = qkv(requires_grad=why == "gradient")
    if why == "float64":
        tensors = [t.double() for t in tensors]
    if why == "mixed dtypes":
        tensors[2] = tensors[2].bfloat16()
    if why == "native off":
        set_env(LLM2VEC_FAST_NATIVE="0")
    for op in ("attention", "rms_norm", "rotary"):
        assert backends.choose(op, *tensors).name == "torch"
    for block in ("mlp", "attention_block"):  # (input, weight, the prepared GEMMs' dtype)
        assert backends.choose(block, tensors[0], tensors[2], None).name == "torch"


def test_the_choice_is_logged_once_per_op_and_implementation(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO, logger="llm2vec_fast.backends"):
        for _ in range(3):
            backends.choose("pooling", torch.ones(2, 3))
    assert [r.getMessage() for r in caplog.records] == ["llm2vec-fast: pooling runs on torch (cpu float32)"]


def test_env_prints_versions_settings_and_the_table(capsys):
    assert cli_main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert set(info["settings"]) >= {"native", "cpu_attention", "cpu_gemm", "cpu_dtype", "cache_dir"}
    rows = [(r["op"], r["implementation"]) for r in info["backends"]]
    assert rows == [(op, impl.name) for op, impls in backends.TABLE.items() for impl in impls]
    assert cli_main(["env"]) == 0
    assert "attention  cpp-portable" in capsys.readouterr().out
