"""Varlen bidirectional attention: Triton kernels (through the interpreter on CPU) and the CPU path, against the
naive per-sequence reference in float64, forward and every gradient, in fp32, fp16 and bf16. bf16 runs the full
parametrisation (about 10 s more; conftest's ``interpreter_bf16`` makes the interpreter's bf16 match the GPU's)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from devices import CPU, DEVICE, get_rng_state, on, set_rng_state
from hypothesis import strategies as st

from llm2vec_fast.kernels import attention
from llm2vec_fast.kernels.attention import (
    naive_varlen_attention,
    varlen_attention,
    varlen_attention_dropout_mask,
)

FP = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (lengths, Hq, Hkv, D): odd lengths, GQA ratios 1/3/4, head dims 64/128 and odd ones, an empty entry.
SHAPES = [
    ([1], 1, 1, 64),
    ([63], 3, 1, 64),
    ([111], 4, 1, 128),
    ([257], 2, 2, 128),
    ([5, 0, 63, 1, 40], 6, 2, 80),
    ([17, 33, 0], 4, 4, 40),
]


def shape_id(lengths, hq, hkv, d, dtype=None):
    sid = f"B{len(lengths)}-T{sum(lengths)}-Hq{hq}-Hkv{hkv}-D{d}"
    return sid if dtype is None else f"{sid}-{dtype}"


def make_inputs(lengths, hq, hkv, d, dtype, seed=0, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q = (torch.randn(T, hq, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(T, hkv, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(T, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(T, hq, d, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return tuple(x.to(device) for x in (q, k, v, do, cu))


def run(fn, q, k, v, do, **kw):
    """Forward + backward of fn on fresh leaves; returns (out, dq, dk, dv)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return out.detach(), dq, dk, dv


def check_all(check, got, q, k, v, do, cu, dtype, **ref_kw):
    ref64 = run(lambda q, k, v: naive_varlen_attention(q, k, v, cu, **ref_kw), q.double(), k.double(),
                v.double(), do.double())
    reflp = run(lambda q, k, v: naive_varlen_attention(q, k, v, cu, **ref_kw), q, k, v, do)
    for name, a, r64, rlp in zip(("out", "dq", "dk", "dv"), got, ref64, reflp):
        check(name, a, r64, rlp, dtype)


@pytest.mark.parametrize("dtype", list(FP))
@pytest.mark.parametrize("lengths,hq,hkv,d", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_triton_matches_reference(check, lengths, hq, hkv, d, dtype):
    dt = FP[dtype]
    q, k, v, do, cu = make_inputs(lengths, hq, hkv, d, dt)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), force_triton=True), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt)


@pytest.mark.parametrize("dtype", list(FP))
@pytest.mark.parametrize("lengths,hq,hkv,d", SHAPES, ids=[shape_id(*s) for s in SHAPES])
def test_cpu_path_matches_reference(check, lengths, hq, hkv, d, dtype):
    dt = FP[dtype]
    q, k, v, do, cu = make_inputs(lengths, hq, hkv, d, dt, device=CPU)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths)), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt)


def test_softmax_scale_and_large_logits(check):
    # Logits of magnitude ~1e3 in fp16: the scores must be formed and exponentiated in fp32 without overflow.
    lengths, dt = [37, 70], torch.float16
    q, k, v, do, cu = make_inputs(lengths, 4, 2, 64, dt, scale=6.0)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, 70, softmax_scale=0.5, force_triton=True), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt, softmax_scale=0.5)


@pytest.mark.parametrize("tiling", [
    dict(fwd_bm=16, fwd_bn=64, dkdv_bm=64, dkdv_bn=16, dq_bm=16, dq_bn=64),
    dict(fwd_bm=64, fwd_bn=16, dkdv_bm=16, dkdv_bn=64, dq_bm=64, dq_bn=16),
], ids=["narrow-rows", "narrow-keys"])
def test_other_tilings(check, kernel_options, tiling):
    # The GPU configurations use non-square tiles; exercise the masks with both orientations.
    kernel_options(tiles=tiling)
    lengths, dt = [3, 0, 70, 17], torch.float32
    q, k, v, do, cu = make_inputs(lengths, 6, 2, 96, dt)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, 70, force_triton=True), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lengths_on_block_boundaries(check, dtype):
    # Only the last key (query) block of a sequence is masked: lengths that are exact multiples of the 32-wide
    # interpreter tiles have no masked block at all, 31 and 33 one each side of the boundary, with dropout on
    # too (the masked and unmasked steps must draw the same keep bits).
    lengths, dt = [32, 64, 0, 96, 31, 33], FP[dtype]
    q, k, v, do, cu = make_inputs(lengths, 4, 2, 32, dt)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, 96, force_triton=True), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt)
    torch.manual_seed(3)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, 96, dropout_p=0.25, force_triton=True), q, k, v, do)
    torch.manual_seed(3)
    mask = varlen_attention_dropout_mask(cu, 96, 4, 0.25)
    check_all(check, got, q, k, v, do, cu, dt, dropout_mask=mask, dropout_p=0.25)


@pytest.mark.parametrize("hq,split", [(6, 3), (8, 2)], ids=["group3-split3", "group4-split2"])
def test_dkdv_split_over_the_gqa_group(check, kernel_options, hq, split):
    # Long sequences with few KV heads split a GQA group over programs that write fp32 partials summed by the
    # host; the result must not depend on the split, with dropout on too.
    lengths, dt = [70, 0, 33], torch.bfloat16
    q, k, v, do, cu = make_inputs(lengths, hq, 2, 32, dt)
    fn = lambda q, k, v: varlen_attention(q, k, v, cu, 70, dropout_p=0.2, force_triton=True)  # noqa: E731
    torch.manual_seed(5)
    whole = run(fn, q, k, v, do)
    kernel_options(tiles=dict(dkdv_split=split))
    torch.manual_seed(5)
    got = run(fn, q, k, v, do)
    torch.manual_seed(5)
    mask = varlen_attention_dropout_mask(cu, 70, hq, 0.2)
    check_all(check, got, q, k, v, do, cu, dt, dropout_mask=mask, dropout_p=0.2)
    assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])  # forward and dQ do not split


def test_rerun_is_bitwise_identical():
    lengths = [50, 0, 77]
    q, k, v, do, cu = make_inputs(lengths, 4, 2, 64, torch.float16)
    a = run(lambda q, k, v: varlen_attention(q, k, v, cu, 77, force_triton=True), q, k, v, do)
    b = run(lambda q, k, v: varlen_attention(q, k, v, cu, 77, force_triton=True), q, k, v, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("force", [True, False], ids=["triton", "cpu"])
def test_empty_batch(force):
    q = torch.randn(0, 2, 64, device=on(force), requires_grad=True)
    k = torch.randn(0, 1, 64, device=on(force), requires_grad=True)
    v = torch.randn(0, 1, 64, device=on(force), requires_grad=True)
    for batch in (0, 2):
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=on(force))
        out = varlen_attention(q, k, v, cu, 0, force_triton=force)
        assert out.shape == (0, 2, 64)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert dq is None or dq.shape == q.shape


def test_long_single_sequence_forward(kernel_options):
    # 8k tokens in one sequence; large tiles keep the interpreter affordable. Checked on a subset of rows.
    kernel_options(tiles=dict(fwd_bm=512, fwd_bn=512))
    T, d = 8192, 16
    q, k, v, _, cu = make_inputs([T], 1, 1, d, torch.float32)
    out = varlen_attention(q, k, v, cu, T, force_triton=True)
    rows = torch.cat([torch.arange(64), torch.arange(T - 64, T)]).to(DEVICE)
    s = torch.einsum("md,nd->mn", q[rows, 0].double(), k[:, 0].double()) / math.sqrt(d)
    ref = torch.softmax(s, -1) @ v[:, 0].double()
    assert torch.isfinite(out).all()
    assert (out[rows, 0].double() - ref).abs().max().item() < 2e-5


# ---------------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------------

DROP_LENGTHS, DROP_CU = [40, 0, 57, 1], torch.tensor([0, 40, 40, 97, 98], dtype=torch.int32, device=DEVICE)


def test_dropout_rate_and_masks_change_between_calls():
    p = 0.3
    m1 = varlen_attention_dropout_mask(DROP_CU, 57, 4, p)
    m2 = varlen_attention_dropout_mask(DROP_CU, 57, 4, p)
    assert [tuple(m.shape) for m in m1] == [(4, n, n) for n in DROP_LENGTHS]
    kept = torch.cat([m.flatten() for m in m1]).float()
    # 4 * (40^2 + 57^2 + 1) = 19,400 Bernoulli draws: the std of the rate is ~0.0033.
    assert abs(kept.mean().item() - (1 - p)) < 0.02
    assert not all(torch.equal(a, b) for a, b in zip(m1, m2))


def test_dropout_keeps_of_one_philox_draw_are_independent():
    # One Philox draw decides a pair of adjacent keys (words 0 and 1): the two decisions, and a key's decision
    # for neighbouring tokens, must be independent. 3 heads x 128^2 = 49,152 draws, 24,576 pairs: a correlation
    # of 0.03 would be ~5 standard deviations.
    p = 0.4
    (m,) = varlen_attention_dropout_mask(torch.tensor([0, 128], dtype=torch.int32, device=DEVICE), 128, 3, p)
    m = m.float()
    assert abs(m.mean().item() - (1 - p)) < 0.015
    for a, b in ((m[:, :, 0::2], m[:, :, 1::2]), (m[:, 0::2, :], m[:, 1::2, :]), (m[0], m[1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.03, corr


def test_dropout_deterministic_for_a_seed():
    q, k, v, do, _ = make_inputs(DROP_LENGTHS, 2, 1, 32, torch.float32)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(run(lambda q, k, v: varlen_attention(q, k, v, DROP_CU, 57, dropout_p=0.2, force_triton=True),
                        q, k, v, do))
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0][0], outs[2][0])


@pytest.mark.parametrize("dtype", list(FP))
def test_dropout_matches_reference_with_identical_mask(check, dtype):
    dt, p = FP[dtype], 0.3
    q, k, v, do, _ = make_inputs(DROP_LENGTHS, 6, 2, 64, dt)
    torch.manual_seed(123)
    got = run(lambda q, k, v: varlen_attention(q, k, v, DROP_CU, 57, dropout_p=p, force_triton=True), q, k, v, do)
    torch.manual_seed(123)
    mask = varlen_attention_dropout_mask(DROP_CU, 57, 6, p)
    check_all(check, got, q, k, v, do, DROP_CU, dt, dropout_mask=mask, dropout_p=p)


def test_dropout_replays_with_rng_state():
    # GradCache re-runs the forward after restoring the generator state: the masks must replay.
    q, k, v, do, _ = make_inputs(DROP_LENGTHS, 2, 1, 64, torch.float32)
    state = get_rng_state()
    a = varlen_attention(q, k, v, DROP_CU, 57, dropout_p=0.5, force_triton=True)
    set_rng_state(state)
    b = varlen_attention(q, k, v, DROP_CU, 57, dropout_p=0.5, force_triton=True)
    assert torch.equal(a, b)


def test_cpu_path_dropout():
    q, k, v, do, cu = make_inputs([30, 0, 45], 4, 2, 64, torch.float32, device=CPU)
    torch.manual_seed(3)
    a = run(lambda q, k, v: varlen_attention(q, k, v, cu, 45, dropout_p=0.3), q, k, v, do)
    torch.manual_seed(3)
    b = run(lambda q, k, v: varlen_attention(q, k, v, cu, 45, dropout_p=0.3), q, k, v, do)
    c = run(lambda q, k, v: varlen_attention(q, k, v, cu, 45), q, k, v, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y) and torch.isfinite(x).all()
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("force_triton", [True, False], ids=["triton", "cpu"])
def test_autocast_mixed_dtypes_compute_in_autocast_dtype(check, force_triton):
    # fp32 weights under bf16 autocast: the projections give bf16, rotary embeddings promote q and k back to fp32.
    # SDPA casts all three to bf16 there; so do we, and each gradient comes back in its input's dtype.
    lengths = [5, 0, 40, 1, 23]
    q, k, v, do, cu = make_inputs(lengths, 6, 2, 64, torch.float32, device=on(force_triton))
    v = v.bfloat16()

    def autocast_attention(q, k, v):
        with torch.autocast(q.device.type, dtype=torch.bfloat16):
            return varlen_attention(q, k, v, cu, 40, force_triton=force_triton)

    got = run(autocast_attention, q, k, v, do)
    assert [x.dtype for x in got] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    q, k = q.bfloat16(), k.bfloat16()
    same = run(lambda q, k, v: varlen_attention(q, k, v, cu, 40, force_triton=force_triton), q, k, v, do)
    for a, b in zip(got, same):
        assert torch.equal(a, b.to(a.dtype))
    check_all(check, got, q, k, v, do, cu, torch.bfloat16)


def test_mixed_dtypes_outside_autocast_are_refused_like_sdpa():
    q, k, v, _, cu = make_inputs([9, 4], 2, 1, 32, torch.float32, device=CPU)
    with pytest.raises(ValueError, match="dtypes differ.*autocast"):
        varlen_attention(q, k, v.bfloat16(), cu, 9)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v.bfloat16()[None])
    # Autocast leaves float64 alone (as it does for SDPA): all-float64 inputs stay float64.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert varlen_attention(q.double(), k.double(), v.double(), cu, 9).dtype == torch.float64


def test_bad_arguments():
    q, k, v, _, cu = make_inputs([4], 3, 2, 64, torch.float32)
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu, 4)
    q, k, v, _, cu = make_inputs([4], 2, 1, 64, torch.float32)
    with pytest.raises(ValueError):
        varlen_attention(q, k, v, cu, 4, dropout_p=1.0)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=3), group=st.sampled_from([1, 2]),
       d=st.sampled_from([16, 24, 32]))
def test_property_tiny_shapes(lengths, group, d):
    q, k, v, do, cu = make_inputs(lengths, 2 * group, 2, d, torch.float32)
    got = run(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), force_triton=True), q, k, v, do)
    ref = run(lambda q, k, v: naive_varlen_attention(q, k, v, cu), q.double(), k.double(), v.double(), do.double())
    for a, r in zip(got, ref):
        assert (a.double() - r).abs().max().item() < 1e-5 if a.numel() else True


@pytest.mark.parametrize("lengths", [[5, 300, 7, 0, 299, 1, 64], [17] * 9, [0, 0], [1]],
                         ids=["mixed-with-empty", "equal", "all-empty", "single"])
def test_cpu_length_groups_cover_every_sequence_and_bound_padding(lengths):
    groups = attention._length_groups(lengths)
    members = sorted(i for g in groups for i in g)
    assert members == [i for i, n in enumerate(lengths) if n > 0]
    for g in groups:
        padded, real = len(g) * max(lengths[i] for i in g), sum(lengths[i] for i in g)
        assert len(g) == 1 or padded <= attention.CPU_PADDING_SLACK * real
