"""llm2vec_fast.settings: every LLM2VEC_FAST_* variable is read there, validated with a message that names it,
and the torchrun ranks are parsed once."""

import pytest

from llm2vec_fast import cpu_linear, native, settings
from llm2vec_fast.default_model import cache_root


def test_defaults(set_env):
    set_env(LLM2VEC_FAST_NATIVE=None, LLM2VEC_FAST_CPU_ATTENTION=None, LLM2VEC_FAST_CPU_GEMM=None,
            LLM2VEC_FAST_CPU_DTYPE=None, LLM2VEC_FAST_ATTENTION_FP32=None, LLM2VEC_FAST_FAULT=None,
            LLM2VEC_FAST_CACHE="/tmp/llm2vec-cache")
    assert settings.current() == settings.Settings(cache_dir="/tmp/llm2vec-cache")


@pytest.mark.parametrize("name,value,field,expected", [
    ("LLM2VEC_FAST_NATIVE", "0", "native", False),
    ("LLM2VEC_FAST_NATIVE", "off", "native", False),
    ("LLM2VEC_FAST_NATIVE", "1", "native", True),
    ("LLM2VEC_FAST_CPU_ATTENTION", "Portable", "cpu_attention", "portable"),
    ("LLM2VEC_FAST_CPU_GEMM", "onednn", "cpu_gemm", "onednn"),
    ("LLM2VEC_FAST_CPU_DTYPE", "mixed", "cpu_dtype", "mixed"),
    ("LLM2VEC_FAST_ATTENTION_FP32", "ieee", "attention_fp32", "ieee"),
    ("LLM2VEC_FAST_FAULT", "shard-committed:3", "fault", "shard-committed:3"),
])
def test_each_variable_sets_its_field(set_env, name, value, field, expected):
    set_env(**{name: value})
    assert getattr(settings.current(), field) == expected


@pytest.mark.parametrize("name", ["LLM2VEC_FAST_CPU_ATTENTION", "LLM2VEC_FAST_CPU_GEMM", "LLM2VEC_FAST_CPU_DTYPE",
                                  "LLM2VEC_FAST_ATTENTION_FP32"])
def test_a_bad_value_is_named_with_the_choices(set_env, name):
    set_env(**{name: "fastest"})
    with pytest.raises(ValueError, match=f"{name}='fastest': choose one of"):
        settings.current()


def test_the_modules_ask_settings(set_env, tmp_path):
    set_env(LLM2VEC_FAST_CACHE=str(tmp_path), LLM2VEC_FAST_NATIVE="0", LLM2VEC_FAST_CPU_GEMM="torch")
    assert cache_root() == str(tmp_path)
    assert native.enabled() is False and native.load() is None
    assert cpu_linear.forced_backend() == "torch"


@pytest.mark.parametrize("env,expected", [
    ({}, settings.Ranks(0, 1, 0)),
    ({"RANK": "1", "WORLD_SIZE": "2"}, settings.Ranks(1, 2, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, settings.Ranks(3, 4, 1)),
])
def test_ranks_from_torchrun_variables(set_env, env, expected):
    set_env(**{"RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, **env})
    assert settings.Ranks.from_env() == expected
    assert expected.is_main == (expected.rank == 0) and expected.distributed == (expected.world_size > 1)


@pytest.mark.parametrize("env,message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "must be integers"),
])
def test_bad_ranks_are_named(set_env, env, message):
    set_env(**{"LOCAL_RANK": None, **env})
    with pytest.raises(ValueError, match=message):
        settings.Ranks.from_env()
