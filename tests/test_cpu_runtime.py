"""The CPU runtime (llm2vec_fast/cpu_runtime/): which forwards a CPU encode swaps, per family and dtype, how the
swaps show in print(model), and that turning them off leaves the Hugging Face model exactly as it was."""

import copy
import pickle
import re

import pytest
import torch

from llm2vec_fast import LLM2Vec, native
from llm2vec_fast.cpu_runtime import (CpuRuntime, cpu_linears, native_cpu_ops, runtime_of, swapped_modules,
                                      use_cpu_linears, use_native_cpu_ops)
from llm2vec_fast.modeling import base_model
from tiny_models import NEW_FAMILIES, build_model_dir

needs_native = pytest.mark.skipif(native.load() is None, reason="the C++ ops cannot be built here")
FAMILIES = ["llama", "mistral", "qwen2", "gemma"]
GEMM_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "mixed": "bfloat16"}


def _layer_swaps(encoder) -> dict:
    """What runs instead in the first decoder layer, by module path inside it."""
    return {name[len("layers.0."):]: what for name, what in swapped_modules(encoder.model).items()
            if name == "layers.0" or name.startswith("layers.0.")}


# What a CPU encode swaps in the first decoder layer, per family, beside the prepared GEMMs of every linear:
# (norms swapped to the C++ rms_norm, decoder layer fused, attention module's label, MLP with the C++ silu_mul).
NORMS = ("input_layernorm", "post_attention_layernorm")
GEMMA2_NORMS = NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
BLOCK = "C++ attention block (rotary + varlen attention)"
EXPECTED_SWAPS = {
    "llama": (NORMS, True, BLOCK, True),
    "mistral": (NORMS, True, BLOCK, True),
    "qwen2": (NORMS, True, BLOCK, True),
    "gemma": (NORMS, True, BLOCK, False),  # GELU-tanh: the C++ SwiGLU does not apply, the MLP stays HF's
    "llama3": (NORMS, True, BLOCK, True),
    "qwen3": (NORMS + QK_NORMS, True, BLOCK, True),  # the block applies q_norm / k_norm itself
    "gemma2": (GEMMA2_NORMS, False, BLOCK, False),  # four norms: HF's layer forward around the swapped blocks
    "gemma3_text": (GEMMA2_NORMS + QK_NORMS, False, BLOCK, False),
    # q/k/v in one qkv_proj and a partial rotary: HF's attention block with the C++ varlen attention; its residual
    # dropouts keep HF's layer forward; gate_up_proj in one linear: HF's MLP.
    "phi3": (NORMS, False, "C++ varlen attention", False),
}


@pytest.fixture(scope="module")
def family_dirs(tiny_model_dirs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cpu_runtime_families")
    return {**tiny_model_dirs, **{family: build_model_dir(str(root / family), family) for family in NEW_FAMILIES}}


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed"])
@pytest.mark.parametrize("family", FAMILIES + list(NEW_FAMILIES))
def test_a_cpu_encode_swaps_these_forwards(family_dirs, family, dtype):
    if family in NEW_FAMILIES and dtype == "bfloat16":
        pytest.skip("the same swaps as float32 and mixed (test time)")
    encoder = LLM2Vec.from_pretrained(family_dirs[family], dtype=dtype, max_batch_tokens=64)
    assert swapped_modules(encoder.model) == {}  # loading swaps nothing; the first CPU encode does
    encoder.encode(["a text", "another one"], show_progress_bar=False)
    gemm = f"prepared {GEMM_DTYPE[dtype]} GEMM"
    swaps = _layer_swaps(encoder)
    norms, fused_layer, attention, silu_mul = EXPECTED_SWAPS[family]
    for name in norms:
        assert swaps.pop(name) == "C++ rms_norm", name
    layer = swaps.pop("", None)
    assert layer.startswith("C++ residual add + rms_norm") if fused_layer else layer is None
    assert swaps.pop("self_attn").startswith(attention)
    linears = [n for n, m in encoder.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 4
    for name in linears:
        assert swaps.pop(name).startswith(gemm), name
    mlp = swaps.pop("mlp", None)
    assert mlp.startswith("C++ silu_mul") if silu_mul else (mlp is None or "C++" not in mlp)
    assert swaps == {}
    assert native_cpu_ops(encoder.model) and cpu_linears(encoder.model)["matmul_dtype"] == GEMM_DTYPE[dtype]


@needs_native
def test_print_model_shows_the_swaps_and_turning_them_off_restores_it(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    before = repr(encoder.model)
    encoder.encode(["a text"], show_progress_bar=False)
    printed = repr(encoder.model)
    assert "LlamaRMSNorm[llm2vec_fast]((64,), eps=1e-06; cpu: C++ rms_norm)" in printed
    assert "LlamaMLP[llm2vec_fast](" in printed and "cpu: C++ silu_mul" in printed
    assert "Linear[llm2vec_fast](in_features=64" in printed and "cpu: prepared float32 GEMM" in printed
    use_native_cpu_ops(encoder.model, enable=False)
    use_cpu_linears(encoder.model, enable=False)
    assert repr(encoder.model) == before
    decoder = base_model(encoder.model)
    assert sorted(k for k in decoder.__dict__ if k.startswith("_llm2vec")) == [
        "_llm2vec_fast_bidirectional", "_llm2vec_fast_runtime",  # patch()'s flags, the (now empty) runtime
        "_llm2vec_fast_stated_noncausal"]
    for module in decoder.children():  # nothing of ours is left on Hugging Face's modules
        assert not [key for key in module.__dict__ if key.startswith("_llm2vec") or key in ("_get_name", "extra_repr")]
        assert "forward" not in module.__dict__


@needs_native
def test_one_runtime_object_holds_the_model_level_state(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    decoder = base_model(encoder.model)
    assert runtime_of(decoder) is None
    encoder.encode(["a text"], show_progress_bar=False)
    runtime = runtime_of(decoder)
    assert isinstance(runtime, CpuRuntime) and runtime.native_ops == native_cpu_ops(encoder.model)
    ours = [key for key in decoder.__dict__ if key.startswith("_llm2vec")]
    assert sorted(ours) == ["_llm2vec_fast_bidirectional", "_llm2vec_fast_runtime", "_llm2vec_fast_stated_noncausal"]


@needs_native
def test_a_swapped_model_pickles_and_copies_with_its_swaps(llama_dir):
    """Ray ships models by pickle: a clone keeps its swaps, bound to the clone's own modules, and encodes alike."""
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    expected = encoder.encode(["a text", "two"], show_progress_bar=False)  # a CPU encode swaps the forwards
    for clone in (pickle.loads(pickle.dumps(encoder)), copy.deepcopy(encoder)):
        layer = clone.model.layers[0]
        assert layer.forward.args[0] is layer and layer.mlp.forward.args[0] is layer.mlp
        torch.testing.assert_close(clone.encode(["a text", "two"], show_progress_bar=False), expected, atol=0, rtol=0)
        unmeasured = lambda swaps: {k: re.sub(r" \((torch|onednn)\)", "", v) for k, v in swaps.items()}  # noqa: E731
        # (a GEMM's backend shows once that GEMM ran: the clone's fused q/k/v leaves q_proj's own unprepared)
        assert unmeasured(swapped_modules(clone.model)) == unmeasured(swapped_modules(encoder.model))


def test_without_the_native_library_only_the_gemms_are_prepared(set_env, llama_dir):
    set_env(LLM2VEC_FAST_NATIVE="0")
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    encoder.encode(["a text"], show_progress_bar=False)
    assert native_cpu_ops(encoder.model) == ()
    swaps = _layer_swaps(encoder)
    assert swaps and all("prepared float32 GEMM" in what and "C++" not in what for what in swaps.values())
