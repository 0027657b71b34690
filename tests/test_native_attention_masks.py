"""The C++ varlen attention with causality, sliding windows and logit softcapping (csrc/cpu_ops.cpp through
llm2vec_fast.cpu_ops.varlen_attention), both kernels, against Hugging Face's eager attention written out here.

The rule of tests/test_native.py: error vs a float64 reference at most twice the error of the same computation in
the input precision, NaN-poisoned outputs, the same bits with 1 and 2 threads and on a re-run. Masked keys must be
excluded exactly: changing them leaves the rows that cannot see them bit for bit unchanged.
"""

import pytest
import torch

from llm2vec_fast import cpu_ops, native
from llm2vec_fast.kernels.attention import naive_varlen_attention
from test_native import _close, _threads_and_rerun

DTYPES = [torch.float32, torch.bfloat16]
KERNELS = ["brgemm", "portable"]
# Odd lengths in one pack (several query blocks in 257 and 111), an empty sequence among them.
LENGTHS = [63, 1, 0, 257, 111]
# GQA ratios 1, 3 and 4; D=33 is odd (the brgemm kernel's VNNI pad column).
HEADS = [(4, 4, 64), (9, 3, 40), (8, 2, 33)]
# Windows of 1 (each query sees itself only), 16, 37 (not a multiple of the kernels' 16-key granularity) and larger
# than every sequence; softcap 5 with scores well beyond it. Each mask with one head layout, the models' own
# combinations (Gemma 2: causal + window + softcap, Qwen3 / Gemma 3 sliding layers: causal + window) with all three.
MASKS = [dict(causal=True), dict(window=1), dict(window=16), dict(window=37), dict(window=1000),
         dict(causal=True, window=1), dict(softcap=5.0), dict(softcap=5.0, window=16)]
CASES = ([(mask, HEADS[n % len(HEADS)]) for n, mask in enumerate(MASKS)]
         + [(mask, heads) for mask in (dict(causal=True, window=16), dict(softcap=5.0, causal=True, window=37))
            for heads in HEADS])


def _mask_id(mask):
    parts = ["causal"] if mask.get("causal") else []
    parts += [f"W{mask['window']}"] if mask.get("window") else []
    parts += [f"cap{mask['softcap']:g}"] if mask.get("softcap") else []
    return "-".join(parts)


def eager_reference(q, k, v, cu_seqlens, scale, causal=False, window=None, softcap=None):
    """Hugging Face's eager attention per packed sequence, in the inputs' dtype (float64 for the truth): scores
    (q k^T) * scale, capped as softcap * tanh(s / softcap), masked with -inf outside j <= i (causal) and
    |i - j| < window, softmax in float32 (float64 for float64 inputs) cast back, then @ v."""
    return naive_varlen_attention(q, k, v, cu_seqlens, scale, causal=causal, window=window, softcap=softcap,
                                  float32_softmax=True)


@pytest.fixture(autouse=True)
def library(kernel_options):
    if native.load() is None:
        pytest.skip("the C++ ops cannot be built here (no compiler / ninja); llm2vec_fast.native warned why")
    kernel_options(poison=True)  # an output element the kernel never writes stays NaN and fails


def _skip_unavailable(kernel, dtype):
    if kernel == "brgemm" and not torch.ops.llm2vec_fast.brgemm_attention_available(dtype):
        pytest.skip(f"oneDNN's brgemm has no {dtype} micro-kernels on this CPU")


def _inputs(heads, dtype, amplitude, lengths=LENGTHS, seed=0):
    HQ, HKV, D = heads
    T = sum(lengths)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed + T + HQ + D)
    q = (torch.randn(T, HQ, D, generator=g) * amplitude).to(dtype)
    k = (torch.randn(T, HKV, D, generator=g) * amplitude).to(dtype)
    v = torch.randn(T, HKV, D, generator=g).to(dtype)
    return q, k, v, cu


_references: dict = {}


def _case(mask, heads, dtype):
    """(q, k, v, cu, scale, the same-precision reference, the float64 truth), computed once for both kernels."""
    key = (_mask_id(mask), heads, dtype)
    if key not in _references:
        # Softcapped: scores of a few tens, so that the cap saturates; otherwise a few units.
        q, k, v, cu = _inputs(heads, dtype, 6.0 if "softcap" in mask else 2.0)
        scale = heads[2] ** -0.5
        _references[key] = (q, k, v, cu, scale, eager_reference(q, k, v, cu, scale, **mask),
                            eager_reference(q.double(), k.double(), v.double(), cu, scale, **mask))
    return _references[key]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask, heads", CASES, ids=lambda c: _mask_id(c) if isinstance(c, dict)
                         else f"HQ{c[0]}-HKV{c[1]}-D{c[2]}")
def test_masked_varlen_attention(mask, heads, dtype, kernel):
    _skip_unavailable(kernel, dtype)
    q, k, v, cu, scale, same, truth = _case(mask, heads, dtype)
    ours = cpu_ops.varlen_attention(q, k, v, cu, scale, kernel=kernel, **mask)
    assert ours.dtype == dtype and ours.shape == q.shape
    _close(ours, same, truth, f"varlen_attention {_mask_id(mask)} ({kernel})")
    _threads_and_rerun(lambda: (cpu_ops.varlen_attention(q, k, v, cu, scale, kernel=kernel, **mask),))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("mask", [dict(causal=True), dict(window=16), dict(causal=True, window=37, softcap=5.0)],
                         ids=_mask_id)
def test_masked_keys_never_reach_the_output(mask, dtype, kernel):
    """Keys a row cannot see get probability 0 exactly: replacing them by huge values changes no bit of that
    row, in a sequence of several query blocks (and its neighbours in the pack)."""
    _skip_unavailable(kernel, dtype)
    lengths = [40, 300, 7]
    q, k, v, cu = _inputs((8, 2, 64), dtype, 2.0, lengths)
    start, L, changed = lengths[0], lengths[1], 150  # key 150 of the middle sequence, and the keys after it
    k2, v2 = k.clone(), v.clone()
    keys = slice(start + changed, start + L) if mask.get("causal") else slice(start + changed, start + changed + 1)
    k2[keys] = k2[keys] * 1000
    v2[keys] = v2[keys] * 1000 + 1000
    before = cpu_ops.varlen_attention(q, k, v, cu, kernel=kernel, **mask)
    after = cpu_ops.varlen_attention(q, k2, v2, cu, kernel=kernel, **mask)
    i = torch.arange(sum(lengths)) - start
    blind = (i < changed) if mask.get("causal") else (i - changed).abs() >= mask["window"]
    blind |= (i < 0) | (i >= L)  # the other sequences
    sees = ~blind
    assert torch.equal(before[blind], after[blind]), "a masked key changed the output"
    assert not torch.equal(before[sees], after[sees])  # and the rows that see them do change


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_a_window_longer_than_every_sequence_is_no_window(dtype, kernel):
    """The same bits as full bidirectional attention, whose work items and roundings it shares."""
    _skip_unavailable(kernel, dtype)
    q, k, v, cu = _inputs((9, 3, 64), dtype, 2.0)
    full = cpu_ops.varlen_attention(q, k, v, cu, kernel=kernel)
    assert torch.equal(cpu_ops.varlen_attention(q, k, v, cu, kernel=kernel, window=max(LENGTHS)), full)
    assert torch.equal(cpu_ops.varlen_attention(q, k, v, cu, kernel=kernel, causal=False, window=None,
                                                softcap=None), full)


@pytest.mark.parametrize("mask", [dict(causal=True, window=16), dict(softcap=5.0, window=37)], ids=_mask_id)
def test_masked_fp32_probs(mask):
    """bf16 q / k / v with fp32_probs (the mixed mode) and a mask: as accurate as fp32 attention on the bf16
    inputs, rounded once at the end."""
    _skip_unavailable("brgemm", torch.bfloat16)
    q, k, v, cu = _inputs((9, 3, 64), torch.bfloat16, 6.0 if "softcap" in mask else 2.0)
    scale = 64 ** -0.5
    truth = eager_reference(q.double(), k.double(), v.double(), cu, scale, **mask)
    same = eager_reference(q.float(), k.float(), v.float(), cu, scale, **mask).bfloat16()
    ours = cpu_ops.varlen_attention(q, k, v, cu, scale, fp32_probs=True, kernel="brgemm", **mask)
    _close(ours, same, truth, f"varlen_attention fp32_probs {_mask_id(mask)}")
    _threads_and_rerun(lambda: (cpu_ops.varlen_attention(q, k, v, cu, scale, fp32_probs=True, kernel="brgemm",
                                                         **mask),))


@pytest.mark.parametrize("arguments, message", [
    (dict(window=0), "window must be a positive number of tokens"),
    (dict(window=-4), "window must be a positive number of tokens"),
    (dict(window=2.5), "window must be a positive number of tokens"),
    (dict(window=True), "window must be a positive number of tokens"),
    (dict(softcap=0.0), "softcap must be a positive number"),
    (dict(softcap=-30.0), "softcap must be a positive number"),
    (dict(softcap=float("inf")), "softcap must be a positive number"),
    (dict(softcap=float("nan")), "softcap must be a positive number"),
])
def test_invalid_window_or_softcap(arguments, message):
    q, k, v, cu = _inputs((4, 4, 64), torch.float32, 1.0, [5])
    with pytest.raises(ValueError, match=message):
        cpu_ops.varlen_attention(q, k, v, cu, **arguments)


def test_the_op_itself_refuses_a_negative_window_or_softcap():
    q, k, v, cu = _inputs((4, 4, 64), torch.float32, 1.0, [5])
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="window must be"):
        torch.ops.llm2vec_fast.varlen_attention(q, k, v, cu, 0.125, out, False, "portable", False, -1, 0.0)
    with pytest.raises(RuntimeError, match="softcap must be"):
        torch.ops.llm2vec_fast.varlen_attention(q, k, v, cu, 0.125, out, False, "portable", True, 0, -2.0)
