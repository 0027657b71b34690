"""Segment pooling: Triton kernels (through the interpreter on CPU) and the CPU path against the naive loop in
float64, forward and input gradient, in fp32, fp16 and bf16 (every case in each)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from devices import CPU, DEVICE, on
from hypothesis import strategies as st

from llm2vec_fast.kernels import pooling
from llm2vec_fast.kernels.pooling import POOLING_MODES, naive_segment_pool, segment_pool

FP = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (T, H, ranges): odd sizes, an empty range, a range of one row, overlapping and repeated ranges, uncovered rows.
CASES = {
    "B1-T1-H64": (1, 64, [(0, 1)]),
    "B4-T257-H96-disjoint": (257, 96, [(0, 63), (63, 174), (174, 175), (180, 257)]),
    "B6-T111-H40-overlap-empty": (111, 40, [(0, 50), (10, 30), (10, 30), (60, 60), (40, 111), (110, 111)]),
}


def make(T, H, ranges, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    dout = torch.randn(len(ranges), H, generator=g, dtype=torch.float64).to(dtype)
    starts = torch.tensor([r[0] for r in ranges], dtype=torch.int32)
    ends = torch.tensor([r[1] for r in ranges], dtype=torch.int32)
    return tuple(t.to(device) for t in (x, dout, starts, ends))


def run(fn, x, dout):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, x, dout.to(out.dtype))
    return out.detach(), dx


@pytest.mark.parametrize("force_triton", [True, False], ids=["triton", "cpu"])
@pytest.mark.parametrize("dtype", list(FP))
@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(check, case, mode, dtype, force_triton):
    T, H, ranges = CASES[case]
    dt = FP[dtype]
    x, dout, starts, ends = make(T, H, ranges, dt, device=on(force_triton))
    got = run(lambda x: segment_pool(x, starts, ends, mode, force_triton=force_triton), x, dout)
    ref64 = run(lambda x: naive_segment_pool(x, starts, ends, mode), x.double(), dout.double())
    reflp = run(lambda x: naive_segment_pool(x, starts, ends, mode), x, dout)
    for name, a, r64, rlp in zip(("out", "dhidden"), got, ref64, reflp):
        check(name, a, r64, rlp, dt)


@pytest.mark.parametrize("force_triton", [True, False], ids=["triton", "cpu"])
def test_empty_range_is_zero_and_uncovered_rows_get_zero_grad(force_triton):
    x, dout, starts, ends = make(40, 32, [(5, 5), (10, 20)], torch.float32, device=on(force_triton))
    for mode in POOLING_MODES:
        out, dx = run(lambda x: segment_pool(x, starts, ends, mode, force_triton=force_triton), x, dout)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert not dx[:10].any() and not dx[20:].any()


def test_out_dtype_and_rerun_identical():
    x, dout, starts, ends = make(100, 48, [(0, 37), (37, 100)], torch.float16)
    a = run(lambda x: segment_pool(x, starts, ends, "weighted_mean", torch.float32, force_triton=True), x, dout)
    b = run(lambda x: segment_pool(x, starts, ends, "weighted_mean", torch.float32, force_triton=True), x, dout)
    assert a[0].dtype == torch.float32 and a[1].dtype == torch.float16
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_row_splits(monkeypatch):
    # The GPU configuration splits long segments over several programs; force that branch here.
    real = pooling.pooling_config

    def split_config(device, T, B, H):
        return dict(real(device, T, B, H), splits=3)

    monkeypatch.setattr(pooling, "pooling_config", split_config)
    x, dout, starts, ends = make(200, 32, [(0, 150), (150, 200), (20, 20), (30, 190)], torch.float32)
    for mode in ("mean", "weighted_mean", "last"):
        got = run(lambda x: segment_pool(x, starts, ends, mode, force_triton=True), x, dout)
        ref = run(lambda x: naive_segment_pool(x, starts, ends, mode), x.double(), dout.double())
        for a, r in zip(got, ref):
            assert (a.double() - r).abs().max().item() < 1e-6


def test_bad_mode():
    x, _, starts, ends = make(4, 16, [(0, 4)], torch.float32)
    with pytest.raises(ValueError):
        segment_pool(x, starts, ends, "max")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), T=st.integers(1, 40), mode=st.sampled_from(POOLING_MODES))
def test_property_random_ranges(data, T, mode):
    n = data.draw(st.integers(1, 5))
    ranges = [tuple(sorted(data.draw(st.tuples(st.integers(0, T), st.integers(0, T))))) for _ in range(n)]
    x, dout, starts, ends = make(T, 16, ranges, torch.float32, device=CPU)
    ref = run(lambda x: naive_segment_pool(x, starts, ends, mode), x.double(), dout.double())
    for force in (True, False):
        args = make(T, 16, ranges, torch.float32, device=on(force))
        got = run(lambda x: segment_pool(x, args[2], args[3], mode, force_triton=force), args[0], args[1])
        for a, r in zip(got, ref):
            assert (a.double().cpu() - r).abs().max().item() < 1e-6
