"""The C++ CPU ops (csrc/cpu_ops.cpp via llm2vec_fast.native / cpu_ops) against their PyTorch references.

Each op: float32 and bfloat16 inputs, odd shapes, error vs a float64 reference at most twice the error of the same
PyTorch computation in the input precision, NaN-poisoned outputs, the same bits with 1 and 2 threads and on a
re-run. Then the patch layer: a tiny model of each family encodes the same with and without the native ops, and
the fallbacks (gradients, LLM2VEC_FAST_NATIVE=0, no build possible) keep the PyTorch path.
"""

import os
import sys
import warnings

import pytest
import torch

from llm2vec_fast import LLM2Vec, cpu_ops, native
from llm2vec_fast.kernels.attention import naive_varlen_attention
from llm2vec_fast.cpu_runtime import NATIVE_OPS, native_cpu_ops, use_native_cpu_ops

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 63, 111, 257]
HIDDEN = [64, 576, 100]


@pytest.fixture(autouse=True)
def library(request):
    # The build-key tests only hash files; every other test needs the library (built once per process).
    if request.node.name.startswith("test_build_key"):
        return
    if native.load() is None:
        pytest.skip("the C++ ops cannot be built here (no compiler / ninja); llm2vec_fast.native warned why")


@pytest.fixture(autouse=True)
def poison_outputs(kernel_options):
    """Op outputs start as NaN: an element an op never writes fails the comparison."""
    kernel_options(poison=True)


def _close(ours, reference_same_precision, truth, what):
    """The project's tolerance rule: |ours - truth| <= 2 |pytorch_same_precision - truth| + a small floor."""
    assert not torch.isnan(ours).any(), f"{what}: NaN (an output element was never written)"
    ours_err = (ours.double() - truth).abs().max().item()
    ref_err = (reference_same_precision.double() - truth).abs().max().item()
    floor = 1e-6 * max(1.0, truth.abs().max().item())
    assert ours_err <= 2 * ref_err + floor, f"{what}: error {ours_err:.3e} vs PyTorch's {ref_err:.3e}"


def _threads_and_rerun(fn):
    """fn() gives the same bits with 1 and 2 threads and on a second run."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        two, again = fn(), fn()
    finally:
        torch.set_num_threads(previous)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b), "result depends on the thread count"
        assert torch.equal(b, c), "re-run differs"


def _ids(values, prefix):
    return [f"{prefix}{v}" for v in values]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", HIDDEN, ids=_ids(HIDDEN, "H"))
@pytest.mark.parametrize("rows", ROWS, ids=_ids(ROWS, "R"))
@pytest.mark.parametrize("variant", ["llama", "llama+residual", "gemma", "gemma+residual"])
def test_rms_norm(rows, hidden, dtype, variant):
    gemma, with_residual = variant.startswith("gemma"), variant.endswith("residual")
    g = torch.Generator().manual_seed(rows * 1000 + hidden)
    x = (torch.randn(rows, hidden, generator=g) * 3).to(dtype)
    weight = (torch.randn(hidden, generator=g) * 0.5 + (0 if gemma else 1)).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype) if with_residual else None

    def run(fn, *args, **kw):
        out = fn(*args, residual=residual, gemma=gemma, **kw) if with_residual else fn(*args, gemma=gemma, **kw)
        return out if isinstance(out, tuple) else (out,)

    ours = run(cpu_ops.rms_norm, x, weight, 1e-6)
    same = run(cpu_ops.rms_norm_reference, x, weight, 1e-6)
    if with_residual:  # the residual sum is rounded to the input dtype, then normalised
        assert torch.equal(ours[1], same[1])
        truth = cpu_ops.rms_norm_reference(ours[1].double(), weight.double(), 1e-6, gemma=gemma)
    else:
        truth = cpu_ops.rms_norm_reference(x.double(), weight.double(), 1e-6, gemma=gemma)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    _close(ours[0], same[0], truth, "rms_norm")
    _threads_and_rerun(lambda: run(cpu_ops.rms_norm, x, weight, 1e-6))


@pytest.mark.parametrize("variant", ["llama", "gemma", "llama-residual", "gemma-residual"])
@pytest.mark.parametrize("rows", [1, 63, 257], ids=_ids([1, 63, 257], "R"))
def test_rms_norm_mixed_precision(rows, variant):
    """The mixed mode's norm: a bf16 projection output beside an fp32 stream and weight, a bf16 output; the fp32
    sum is exact and the output is the fp32 norm rounded once."""
    gemma, with_residual = variant.startswith("gemma"), variant.endswith("residual")
    g = torch.Generator().manual_seed(rows)
    hidden = 576
    x = (torch.randn(rows, hidden, generator=g) * 3).to(torch.bfloat16 if with_residual else torch.float32)
    weight = torch.randn(hidden, generator=g) * 0.5 + (0 if gemma else 1)
    residual = torch.randn(rows, hidden, generator=g) if with_residual else None
    kw = dict(residual=residual) if with_residual else {}
    ours = cpu_ops.rms_norm(x, weight, 1e-6, gemma=gemma, out_dtype=torch.bfloat16, **kw)
    same = cpu_ops.rms_norm_reference(x, weight, 1e-6, gemma=gemma, out_dtype=torch.bfloat16, **kw)
    ours, same = (ours, same) if with_residual else ((ours,), (same,))
    assert ours[0].dtype == torch.bfloat16 and not torch.isnan(ours[0].float()).any()
    if with_residual:
        assert ours[1].dtype == torch.float32 and torch.equal(ours[1], same[1])
    stream = ours[1] if with_residual else x
    truth = cpu_ops.rms_norm_reference(stream.double(), weight.double(), 1e-6, gemma=gemma)
    _close(ours[0], same[0], truth, "rms_norm mixed")
    _threads_and_rerun(lambda: tuple(t for t in (cpu_ops.rms_norm(x, weight, 1e-6, gemma=gemma,
                                                                  out_dtype=torch.bfloat16, **kw),)
                                     for t in (t if isinstance(t, tuple) else (t,))))


def test_rotary_fp32_tables_with_bf16_q_k():
    """The mixed mode's rotary: bf16 q / k, fp32 cos / sin, products in fp32 and one rounding to bf16."""
    g = torch.Generator().manual_seed(3)
    T, D = 45, 64
    q = (torch.randn(T, 9, D, generator=g) * 2).bfloat16()
    k = (torch.randn(T, 3, D, generator=g) * 2).bfloat16()
    angles = torch.rand(T, D // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ours = cpu_ops.rotary(q, k, cos, sin)
    same = cpu_ops.rotary_reference(q, k, cos, sin)
    truth = cpu_ops.rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, b, t in zip(ours, same, truth):
        assert a.dtype == torch.bfloat16
        _close(a, b, t, "rotary mixed")
    with pytest.raises(RuntimeError, match="cos / sin"):
        cpu_ops.rotary(q.float(), k.float(), cos.bfloat16(), sin.bfloat16())


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_silu_mul_unrounded_activation(dtype):
    g = torch.Generator().manual_seed(7)
    fused = (torch.randn(63, 2 * 100, generator=g) * 4).to(dtype)
    gate, up = fused[:, :100], fused[:, 100:]
    ours = cpu_ops.silu_mul(gate, up, round_act=False)
    same = cpu_ops.silu_mul_reference(gate, up, round_act=False)
    truth = cpu_ops.silu_mul_reference(gate.double(), up.double())
    _close(ours, same, truth, "silu_mul round_act=False")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 9, 3, 64), (63, 9, 3, 64), (111, 4, 4, 100), (257, 8, 2, 128)],
                         ids=lambda s: f"T{s[0]}-HQ{s[1]}-HKV{s[2]}-D{s[3]}")
def test_rotary(shape, dtype):
    T, HQ, HKV, D = shape
    g = torch.Generator().manual_seed(T)
    # q, k as the attention module hands them over: [T, H, D] views of one [T, H * D] projection each.
    q = torch.randn(T, HQ * D, generator=g).to(dtype).view(T, HQ, D)
    k = torch.randn(T, HKV * D, generator=g).to(dtype).view(T, HKV, D)
    angles = torch.arange(T)[:, None] * torch.rand(D // 2, generator=g)[None, :]
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    ours = cpu_ops.rotary(q, k, cos, sin)
    same = cpu_ops.rotary_reference(q, k, cos, sin)
    for a, b in zip(ours, same):  # same rounding points as PyTorch: bit for bit
        assert torch.equal(a, b)
    truth = cpu_ops.rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, b, t in zip(ours, same, truth):
        _close(a, b, t, "rotary")
    _threads_and_rerun(lambda: cpu_ops.rotary(q, k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", HIDDEN, ids=_ids(HIDDEN, "I"))
@pytest.mark.parametrize("rows", ROWS, ids=_ids(ROWS, "R"))
def test_silu_mul(rows, hidden, dtype):
    g = torch.Generator().manual_seed(rows + hidden)
    fused = (torch.randn(rows, 2 * hidden, generator=g) * 4).to(dtype)
    gate, up = fused[:, :hidden], fused[:, hidden:]  # strided halves, as a fused gate/up projection gives
    ours = cpu_ops.silu_mul(gate, up)
    same = cpu_ops.silu_mul_reference(gate, up)
    truth = cpu_ops.silu_mul_reference(gate.double(), up.double())
    assert ours.dtype == dtype
    _close(ours, same, truth, "silu_mul")
    _threads_and_rerun(lambda: (cpu_ops.silu_mul(gate, up),))


# Odd lengths and head dims (D=33: the VNNI pad column), sequences of several query blocks (257, 130) and of one key
# vector plus a tail (17), an empty sequence, GQA ratios 1, 3 and 4.
ATTENTION_CASES = [([1], 9, 3, 64), ([63], 9, 3, 64), ([5, 0, 111, 1], 9, 3, 64), ([257, 3, 40], 4, 4, 100),
                   ([33, 17], 8, 2, 16), ([130, 7], 8, 2, 33)]


@pytest.mark.parametrize("kernel", ["brgemm", "portable"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=lambda c: f"L{'_'.join(map(str, c[0]))}-HQ{c[1]}-HKV{c[2]}-D{c[3]}")
def test_varlen_attention(case, dtype, kernel, monkeypatch):
    # brgemm: oneDNN's micro-GEMMs where this CPU has them (else the op itself falls back to the portable kernel);
    # portable: LLM2VEC_FAST_CPU_ATTENTION=portable forces the plain C++ kernel, the fallback on other CPUs.
    if kernel == "portable":
        monkeypatch.setenv("LLM2VEC_FAST_CPU_ATTENTION", "portable")
    lengths, HQ, HKV, D = case
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    g = torch.Generator().manual_seed(T + D)
    q = (torch.randn(T, HQ, D, generator=g) * 2).to(dtype)
    k = (torch.randn(T, HKV, D, generator=g) * 2).to(dtype)
    v = torch.randn(T, HKV, D, generator=g).to(dtype)
    ours = cpu_ops.varlen_attention(q, k, v, cu)
    same = naive_varlen_attention(q, k, v, cu)
    truth = naive_varlen_attention(q.double(), k.double(), v.double(), cu)
    assert ours.dtype == dtype and ours.shape == q.shape
    _close(ours, same, truth, "varlen_attention")
    _threads_and_rerun(lambda: (cpu_ops.varlen_attention(q, k, v, cu),))


@pytest.mark.parametrize("case", ATTENTION_CASES[1:4],
                         ids=lambda c: f"L{'_'.join(map(str, c[0]))}-HQ{c[1]}-HKV{c[2]}-D{c[3]}")
def test_varlen_attention_fp32_probs(case):
    """bf16 q / k / v with fp32_probs (the mixed mode): as accurate as fp32 attention on the bf16 inputs, rounded
    once at the end, and more accurate than rounding P to bf16."""
    lengths, HQ, HKV, D = case
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    g = torch.Generator().manual_seed(T + D + 1)
    q, k, v = ((torch.randn(T, h, D, generator=g) * 2).bfloat16() for h in (HQ, HKV, HKV))
    truth = naive_varlen_attention(q.double(), k.double(), v.double(), cu)
    same = naive_varlen_attention(q.float(), k.float(), v.float(), cu).bfloat16()
    ours = cpu_ops.varlen_attention(q, k, v, cu, fp32_probs=True)
    _close(ours, same, truth, "varlen_attention fp32_probs")
    rounded = cpu_ops.varlen_attention(q, k, v, cu)
    assert (ours.double() - truth).abs().mean() <= (rounded.double() - truth).abs().mean()
    _threads_and_rerun(lambda: (cpu_ops.varlen_attention(q, k, v, cu, fp32_probs=True),))


# ---------------------------------------------------------------------------------------------- patch layer


TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today, as investors sold off bank shares.",
         "x", ["Represent the question:", "How do plants make food?"]] * 3


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_encode_same_with_and_without_native_ops(tiny_model_dirs, family):
    encoder = LLM2Vec.from_pretrained(tiny_model_dirs[family], dtype=torch.float32, max_batch_tokens=64)
    assert use_native_cpu_ops(encoder.model, enable=False) == ()
    plain = encoder.encode(TEXTS, show_progress_bar=False)
    applied = use_native_cpu_ops(encoder.model)
    expected = set(NATIVE_OPS) - ({"silu_mul"} if family == "gemma" else set())
    assert set(applied) == expected
    fast = encoder.encode(TEXTS, show_progress_bar=False)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    use_native_cpu_ops(encoder.model, enable=False)
    torch.testing.assert_close(encoder.encode(TEXTS, show_progress_bar=False), plain, atol=0, rtol=0)


def test_encode_turns_native_ops_on_and_keeps_an_explicit_off(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    assert native_cpu_ops(encoder.model) is None
    encoder.encode(["hello"], show_progress_bar=False)
    assert native_cpu_ops(encoder.model)
    use_native_cpu_ops(encoder.model, enable=False)
    encoder.encode(["hello"], show_progress_bar=False)
    assert native_cpu_ops(encoder.model) == ()


def test_gradients_take_the_pytorch_path(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    use_native_cpu_ops(encoder.model)
    features = encoder.tokenize(["a short text", "another text, a little longer"])
    loss = encoder(features).square().sum()
    loss.backward()
    grads = [p.grad for p in encoder.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_encode_close_to_fp32(llama_dir):
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    truth = encoder.encode(TEXTS, show_progress_bar=False)
    encoder.model.to(torch.bfloat16)
    use_native_cpu_ops(encoder.model, enable=False)
    plain = encoder.encode(TEXTS, show_progress_bar=False)
    use_native_cpu_ops(encoder.model)
    fast = encoder.encode(TEXTS, show_progress_bar=False)
    cosine = torch.nn.functional.cosine_similarity
    assert (1 - cosine(fast, truth)).max() <= 2 * (1 - cosine(plain, truth)).max() + 1e-4


def test_env_switch_disables(monkeypatch, llama_dir):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native.load() is None
    encoder = LLM2Vec.from_pretrained(llama_dir, dtype=torch.float32)
    assert use_native_cpu_ops(encoder.model) == ()


def test_unbuildable_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "CSRC", str(tmp_path))  # no sources: nothing to build
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load() is None
        assert native.load() is None
    assert len([w for w in caught if "C++ CPU ops unavailable" in str(w.message)]) == 1


def _fake_jit(monkeypatch, tmp_path):
    """A fresh cache (LLM2VEC_FAST_CACHE), no setup.py build, and torch's JIT build and library load replaced by
    stubs: the build leaves the library file a real one leaves and counts itself in the returned list."""
    import torch.utils.cpp_extension as cpp_extension

    builds = []

    def fake_build(name, sources, build_directory, **kwargs):
        builds.append(build_directory)
        kwargs["extra_ldflags"].append("-L/torch/of/this/install/lib")  # as torch does, in place
        path = os.path.join(build_directory, f"{name}.so")
        open(path, "w").close()
        return path

    monkeypatch.setenv("LLM2VEC_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(native, "_load_library", lambda path: path)
    monkeypatch.setitem(sys.modules, "llm2vec_fast._C", None)  # no setup.py build: importing it fails
    return builds


def test_first_build_says_what_it_does_and_a_cached_load_is_silent(monkeypatch, tmp_path, capsys):
    """A fresh cache announces the ~30 s build on stderr and how long it took; the next load is silent and
    compiles nothing."""
    builds = _fake_jit(monkeypatch, tmp_path)
    directory = native.build_directory()
    assert native.load() == os.path.join(directory, f"{native.LIBRARY_NAME}.so")
    err = capsys.readouterr().err
    assert err.startswith(f"llm2vec-fast: building the C++ CPU ops (once, ~30 s) into {directory} ... done in ")
    assert err.endswith(" s\n") and err.count("\n") == 1
    assert directory.startswith(str(tmp_path / "cache")) and builds == [directory]
    assert native.build_seconds() > 0
    monkeypatch.setattr(native, "_state", {})  # a new process: the library is cached on disk
    assert native.load() == os.path.join(directory, f"{native.LIBRARY_NAME}.so")
    assert capsys.readouterr().err == "" and builds == [directory] and native.build_seconds() == 0


def test_reinstall_elsewhere_loads_the_cached_build(monkeypatch, tmp_path, capsys):
    """The same sources installed into another directory, with newer file times (a `pip install` of the same
    version elsewhere), load the first install's build instead of compiling again."""
    import shutil

    builds = _fake_jit(monkeypatch, tmp_path)
    first, second = tmp_path / "site-a" / "csrc", tmp_path / "site-b" / "csrc"
    shutil.copytree(native.CSRC, first)
    monkeypatch.setattr(native, "CSRC", str(first))
    assert native.load() is not None and len(builds) == 1
    shutil.copytree(native.CSRC, second)
    for path in native.source_files(str(second)):
        os.utime(path, (os.path.getmtime(path) + 3600,) * 2)
    monkeypatch.setattr(native, "CSRC", str(second))
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is not None
    assert len(builds) == 1, "the reinstall compiled the C++ ops again"
    capsys.readouterr()


def test_build_key_ignores_the_install_path_and_follows_the_content(tmp_path):
    """Two copies of csrc/ in different directories have one key (and build directory); one changed byte, a
    flag, the compiler or the torch version gives another."""
    import shutil

    first, second = tmp_path / "a" / "csrc", tmp_path / "elsewhere" / "b" / "csrc"
    shutil.copytree(native.CSRC, first)
    shutil.copytree(native.CSRC, second)
    key = native.build_key(native.source_files(str(first)))
    assert native.build_key(native.source_files(str(second))) == key
    assert native.build_directory(native.build_key(native.source_files(str(second)))) == native.build_directory(key)
    assert native.build_key() == key  # the shipped sources themselves

    source = native.source_files(str(second))[0]
    content = bytearray(open(source, "rb").read())
    content[len(content) // 2] ^= 1
    open(source, "wb").write(bytes(content))
    changed = native.build_key(native.source_files(str(second)))
    assert changed["sources"] != key["sources"]
    assert native.build_directory(changed) != native.build_directory(key)
    for field, value in (("compiler", "c++ (GCC) 0.0"), ("torch", "0.0.0"), ("cflags", ["-O0"])):
        assert native.build_directory({**key, field: value}) != native.build_directory(key), field


def test_build_key_ignores_files_that_are_not_sources(tmp_path):
    """Documentation beside the sources (csrc/README.md) is not part of the build."""
    import shutil

    directory = tmp_path / "csrc"
    shutil.copytree(native.CSRC, directory)
    key = native.build_key(native.source_files(str(directory)))
    (directory / "README.md").write_text("edited\n")
    assert native.build_key(native.source_files(str(directory))) == key
