"""Causal, sliding-window and soft-capped varlen attention (the ``causal``, ``window`` and ``softcap`` arguments):
the Triton kernels (interpreter on CPU) and the CPU path against the float64 naive reference, forward and every
gradient, under the rule of test_attention.py (error <= 2x the same-precision PyTorch error), outputs NaN-poisoned.
The semantics are Hugging Face eager attention's: logits capped (c * tanh(s / c)), then masked to the band
(j <= i when causal, |i - j| < window), then softmaxed."""

import pytest
import torch
from devices import CPU, on
from test_attention import FP, check_all, make_inputs, run

from llm2vec_fast.kernels import attention
from llm2vec_fast.kernels.attention import naive_varlen_attention, varlen_attention, varlen_attention_dropout_mask

# One pack of odd lengths: a single token, sequences shorter and longer than the windows, one of 8+ key blocks.
PACK = [1, 63, 111, 257]

# name -> (mask arguments, Hq): GQA ratios 1, 3 and 4 over one KV head, spread over the cases.
# The query heads are few on the full-attention cases, which cost the interpreter most.
MASKS = {
    "w1": (dict(window=1), 3),  # each token sees only itself
    "w16": (dict(window=16), 3),
    "w100": (dict(window=100), 1),  # longer than the 1- and 63-token sequences, shorter than the others
    "w300": (dict(window=300), 1),  # longer than every sequence: no window at all
    "cap5": (dict(softcap=5.0), 1),
    "causal": (dict(causal=True), 1),
    "causal-w16": (dict(causal=True, window=16), 4),
    "causal-w16-cap5": (dict(causal=True, window=16, softcap=5.0), 3),  # Gemma 2, causal
    "w16-cap5": (dict(window=16, softcap=5.0), 4),  # Gemma 2, bidirectional
}
D = 32
# 64-row/64-key blocks for the long pack: the interpreter's cost is per (program x block step), and 64 still leaves
# the 257-token sequence five blocks, the band's first block off zero and a partial last block.
TILES_64 = dict(fwd_bm=64, fwd_bn=64, dkdv_bm=64, dkdv_bn=64, dq_bm=64, dq_bn=64)


def _scale(name):
    """How much larger than N(0, 1) the q and k entries are drawn for a case."""
    if "cap" in name:
        return 2.0  # logits of standard deviation ~4, so a cap of 5 bends most of them
    if name == "w1":
        # Every softmax has one key: PyTorch's probability is exactly 1 and its dQ, dK exactly 0, while the kernels
        # recompute p = exp2(s - lse) from a second dot product (FlashAttention's backward), off by the rounding of
        # s. Logits near 0 keep that rounding under the test's floor.
        return 0.5
    return 1.0


def _triton(cu, max_seqlen, **kw):
    return lambda q, k, v: varlen_attention(q, k, v, cu, max_seqlen, force_triton=True, **kw)


@pytest.mark.parametrize("name", list(MASKS))
def test_triton_masks_match_reference(check, kernel_options, name):
    kernel_options(tiles=TILES_64)
    kw, hq = MASKS[name]
    q, k, v, do, cu = make_inputs(PACK, hq, 1, D, torch.float32, scale=_scale(name))
    got = run(_triton(cu, max(PACK), **kw), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, torch.float32, **kw)


@pytest.mark.parametrize("name,dtype", [("causal-w16-cap5", "bf16"), ("w16-cap5", "fp16"), ("causal", "bf16")])
def test_triton_masks_16bit(check, kernel_options, name, dtype):
    kernel_options(tiles=TILES_64)
    kw, hq = MASKS[name]
    dt = FP[dtype]
    lengths = [1, 63, 111]  # the 16-bit runs skip the longest sequence to stay quick
    q, k, v, do, cu = make_inputs(lengths, hq, 1, D, dt, scale=_scale(name))
    got = run(_triton(cu, max(lengths), **kw), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, dt, **kw)


@pytest.mark.parametrize("name", ["causal-w16-cap5", "w16", "causal"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_masks_with_dropout(check, name, dtype):
    # The keep-masks are the unmasked call's (same RNG stream), applied to probabilities that are 0 off the band.
    kw, hq = MASKS[name]
    lengths, dt, p = [40, 0, 57, 1], FP[dtype], 0.3
    q, k, v, do, cu = make_inputs(lengths, hq, 1, D, dt, scale=_scale(name))
    torch.manual_seed(11)
    got = run(_triton(cu, 57, dropout_p=p, **kw), q, k, v, do)
    torch.manual_seed(11)
    mask = varlen_attention_dropout_mask(cu, 57, hq, p)
    check_all(check, got, q, k, v, do, cu, dt, dropout_mask=mask, dropout_p=p, **kw)


@pytest.mark.parametrize("tiling", [
    dict(fwd_bm=16, fwd_bn=64, dkdv_bm=64, dkdv_bn=16, dq_bm=16, dq_bn=64),
    dict(fwd_bm=64, fwd_bn=16, dkdv_bm=16, dkdv_bn=64, dq_bm=64, dq_bn=16),
], ids=["narrow-rows", "narrow-keys"])
@pytest.mark.parametrize("name", ["causal-w16", "w16-cap5"])
def test_band_with_other_tilings(check, kernel_options, tiling, name):
    # The band's first block is rounded down to the key (query) block: with BM != BN the rows of one block see
    # keys of blocks they only partly overlap, on either side.
    kernel_options(tiles=tiling)
    kw, _ = MASKS[name]
    lengths = [3, 0, 70, 17]
    q, k, v, do, cu = make_inputs(lengths, 4, 2, D, torch.float32, scale=_scale(name))
    got = run(_triton(cu, 70, **kw), q, k, v, do)
    check_all(check, got, q, k, v, do, cu, torch.float32, **kw)


def test_window_past_every_sequence_is_no_window():
    # A window >= max_seqlen restricts nothing; it is dropped before the launch (one compile, no band masking).
    lengths = [9, 30]
    q, k, v, do, cu = make_inputs(lengths, 2, 1, D, torch.float32)
    plain = run(_triton(cu, 30), q, k, v, do)
    for window in (30, 1000):
        for a, b in zip(run(_triton(cu, 30, window=window), q, k, v, do), plain):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_path_masks_match_reference(check, name, dtype):
    kw, hq = MASKS[name]
    dt = FP[dtype]
    # PACK, plus lengths that share one padded SDPA group (63, 60, 57): its padding rows must keep a non-empty
    # band, or their NaN probabilities would reach dK/dV.
    for lengths in (PACK, [63, 60, 57, 1, 20]):
        q, k, v, do, cu = make_inputs(lengths, hq, 1, D, dt, scale=_scale(name), device=CPU)
        got = run(lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), **kw), q, k, v, do)
        check_all(check, got, q, k, v, do, cu, dt, **kw)


@pytest.mark.parametrize("name", ["causal-w16-cap5", "w1", "causal"])
def test_cpu_path_masks_with_dropout(name):
    # CPU dropout comes from torch's generator (SDPA's or F.dropout on the capped path): the same seed gives the
    # same result, gradients stay finite, and it differs from the undropped result.
    kw, hq = MASKS[name]
    q, k, v, do, cu = make_inputs([63, 60, 57, 1], hq, 1, D, torch.float32, scale=_scale(name), device=CPU)
    fn = lambda q, k, v: varlen_attention(q, k, v, cu, 63, dropout_p=0.3, **kw)  # noqa: E731
    torch.manual_seed(3)
    a = run(fn, q, k, v, do)
    torch.manual_seed(3)
    b = run(fn, q, k, v, do)
    c = run(lambda q, k, v: varlen_attention(q, k, v, cu, 63, **kw), q, k, v, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y) and torch.isfinite(x).all()
    if name != "w1":  # a window of 1 leaves one probability per row, which dropout keeps or zeroes
        assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("bad", [
    dict(window=0), dict(window=-3), dict(window=2.5), dict(window=True), dict(window="16"),
    dict(softcap=0.0), dict(softcap=-1.0), dict(softcap=float("inf")), dict(softcap=float("nan")),
    dict(softcap=True), dict(causal=None), dict(causal="yes"),
], ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()))
@pytest.mark.parametrize("force", [True, False], ids=["triton", "cpu"])
def test_bad_mask_arguments_name_the_problem(bad, force):
    q, k, v, _, cu = make_inputs([4, 5], 2, 1, 16, torch.float32, device=on(force))
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be"):
        varlen_attention(q, k, v, cu, 5, force_triton=force, **bad)


def test_accepted_mask_argument_types():
    # An int cap and numpy-style integers are fine; the kernels get a float cap and an int window.
    assert attention._check_mask_options(True, 16, 50) == (True, 16, 50.0)
    assert attention._check_mask_options(False, torch.tensor(8).item(), None) == (False, 8, None)


def test_naive_reference_semantics():
    # The reference itself, on one tiny sequence: masked entries get no probability, the diagonal always does,
    # and the cap bounds every logit.
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(6, 1, 8, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    v = torch.eye(6, dtype=torch.float64)[:, None, :].expand(6, 1, 6).contiguous()  # [L, 1, L]: out = probs
    # Head dim 6 for v only: the reference allows it, so out[i, 0, j] is the probability of key j for query i.
    cu = torch.tensor([0, 6], dtype=torch.int32)
    pos = torch.arange(6)
    dist = pos[:, None] - pos[None, :]
    for kw, allowed in ((dict(causal=True), dist >= 0), (dict(window=2), dist.abs() < 2),
                        (dict(causal=True, window=3), (dist >= 0) & (dist < 3))):
        probs = naive_varlen_attention(q, k, v, cu, **kw)[:, 0]
        assert (probs[~allowed] == 0).all() and (probs.diagonal() > 0).all()
        assert torch.allclose(probs.sum(-1), torch.ones(6, dtype=torch.float64))
    capped = naive_varlen_attention(q, k, v, cu, softmax_scale=1.0, softcap=1.0)[:, 0]
    # Logits within [-1, 1]: no probability can exceed e^2 times another in its row.
    assert (capped.max(-1).values / capped.min(-1).values).max() <= torch.e ** 2 + 1e-9
