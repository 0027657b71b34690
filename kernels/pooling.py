"""Masked segment pooling over packed hidden states.

``hidden [T, H]`` holds the tokens of all sequences back to back; segment ``i`` pools the rows
``starts[i] <= t < ends[i]``. Modes: ``mean`` (weights 1/L), ``weighted_mean`` (weights (j+1) / (L(L+1)/2) for
the j-th row of the range, increasing toward its end, as llm2vec's weighted mean), ``first`` / ``last`` (the row at
``starts[i]`` / ``ends[i] - 1``, run as a mean over a range of at most one row). An empty range gives a zero row.

The file holds the Triton kernels (forward, backward), the launch configuration, the host functions, the autograd
Function, the vectorised PyTorch path for CPU tensors, the public entry point and the naive reference.
"""

import torch

from ._common import _alloc, _interpreting
from ._triton import HAS_TRITON, require_triton, tl, triton

POOLING_MODES = ("mean", "weighted_mean", "first", "last")


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


# The kernels exist only where Triton is installed (the gpu extra); the CPU paths below never need them.
if HAS_TRITON:

    @triton.jit(do_not_specialize=["B", "H", "CHUNK"])
    def _pool_fwd_kernel(
        x, starts, ends, out, stride_xt, stride_os, stride_ob, B, H, CHUNK,
        WEIGHTED: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr,
    ):
        # One program: BH columns of segment i_b, restricted to the rows of split i_s ([i_s*CHUNK, (i_s+1)*CHUNK)),
        # so a few long segments still fill the device; the host sums the splits (no atomics).
        i_b = tl.program_id(0).to(tl.int64)
        i_hb = tl.program_id(1).to(tl.int64)
        i_s = tl.program_id(2).to(tl.int64)
        s = tl.load(starts + i_b).to(tl.int64)
        e = tl.load(ends + i_b).to(tl.int64)
        L = tl.maximum(e - s, 0)
        lo = tl.maximum(s, i_s * CHUNK)
        hi = tl.minimum(e, (i_s + 1) * CHUNK)
        o_r = tl.arange(0, BR)
        o_h = i_hb * BH + tl.arange(0, BH)
        m_h = o_h < H
        b_acc = tl.zeros([BR, BH], tl.float32)
        for r0 in range(lo, hi, BR):
            m_r = (r0 + o_r) < hi
            b_x = tl.load(x + (r0 + o_r)[:, None] * stride_xt + o_h[None, :], mask=m_r[:, None] & m_h[None, :],
                          other=0.0)  # [BR, BH]
            if WEIGHTED:
                b_w = (r0 + o_r - s + 1).to(tl.float32)  # [BR]
                b_acc += b_x.to(tl.float32) * b_w[:, None]
            else:
                b_acc += b_x.to(tl.float32)
        Lf = L.to(tl.float32)
        if WEIGHTED:
            denom = Lf * (Lf + 1.0) * 0.5
        else:
            denom = Lf
        denom = tl.where(denom > 0.0, denom, 1.0)
        b_out = tl.sum(b_acc, 0) / denom  # [BH]
        tl.store(out + i_s * stride_os + i_b * stride_ob + o_h, b_out.to(out.dtype.element_ty), mask=m_h)


    @triton.jit(do_not_specialize=["T", "B", "H"])
    def _pool_bwd_kernel(
        dout, starts, ends, dx, stride_db, stride_dxt, T, B, H,
        WEIGHTED: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr, BB: tl.constexpr,
    ):
        # One program: BR rows x BH columns of d hidden. It scans the segments BB at a time, skips chunks that miss
        # its rows, and adds W @ dout with W[r, b] the weight of row r in segment b: overlapping ranges are summed,
        # uncovered rows get zeros, every element has one writer.
        i_r = tl.program_id(0).to(tl.int64)
        i_hb = tl.program_id(1).to(tl.int64)
        o_r = i_r * BR + tl.arange(0, BR)
        o_h = i_hb * BH + tl.arange(0, BH)
        m_h = o_h < H
        r_lo = i_r * BR
        r_hi = r_lo + BR
        b_acc = tl.zeros([BR, BH], tl.float32)
        for b0 in range(0, B, BB):
            o_b = b0 + tl.arange(0, BB)
            m_b = o_b < B
            b_s = tl.load(starts + o_b, mask=m_b, other=0).to(tl.int64)  # [BB]
            b_e = tl.load(ends + o_b, mask=m_b, other=0).to(tl.int64)  # [BB]
            b_hit = m_b & (b_s < r_hi) & (b_e > r_lo) & (b_e > b_s)
            if tl.max(b_hit.to(tl.int32), 0) > 0:
                b_L = (b_e - b_s).to(tl.float32)
                if WEIGHTED:
                    b_denom = tl.where(b_hit, b_L * (b_L + 1.0) * 0.5, 1.0)
                    b_w = (o_r[:, None] - b_s[None, :] + 1).to(tl.float32) / b_denom[None, :]  # [BR, BB]
                else:
                    b_denom = tl.where(b_hit, b_L, 1.0)
                    b_w = (1.0 / b_denom)[None, :] + tl.zeros([BR, BB], tl.float32)  # [BR, BB]
                m_in = (o_r[:, None] >= b_s[None, :]) & (o_r[:, None] < b_e[None, :]) & b_hit[None, :]
                b_w = tl.where(m_in, b_w, 0.0)
                b_do = tl.load(dout + o_b[:, None] * stride_db + o_h[None, :], mask=b_hit[:, None] & m_h[None, :],
                               other=0.0).to(tl.float32)  # [BB, BH]
                # fp32 FMA, not TF32: the weights 1/L must not be rounded to 10 bits.
                b_acc += tl.dot(b_w, b_do, input_precision="ieee")
        tl.store(dx + o_r[:, None] * stride_dxt + o_h[None, :], b_acc.to(dx.dtype.element_ty),
                 mask=(o_r < T)[:, None] & m_h[None, :])


# --------------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------------


def pooling_config(device, T, B, H):
    """Forward: BR rows x BH columns per step and the number of row splits; backward: BR x BH tile, BB segments
    per scan step."""
    if device.type != "cuda" or _interpreting():
        return dict(fwd_br=32, fwd_bh=min(128, max(16, triton.next_power_of_2(H))), splits=1, fwd_warps=4,
                    bwd_br=32, bwd_bh=min(128, max(16, triton.next_power_of_2(H))), bwd_bb=16, bwd_warps=4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bh = min(256, max(16, triton.next_power_of_2(H)))
    # Enough programs for every SM: narrow the column tile first, then split long segments over rows.
    while bh > 64 and B * triton.cdiv(H, bh) < 2 * sms:
        bh //= 2
    programs = B * triton.cdiv(H, bh)
    splits = 1
    if programs < 2 * sms and T >= 4096:
        splits = min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(T, 1024))
    return dict(fwd_br=32, fwd_bh=bh, splits=splits, fwd_warps=8 if bh >= 256 else 4,
                bwd_br=64, bwd_bh=min(128, max(16, triton.next_power_of_2(H))), bwd_bb=16, bwd_warps=4)


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def _mode_ranges(starts, ends, mode):
    """first / last become mean over a range of at most one row (empty stays empty)."""
    if mode == "first":
        return starts, torch.minimum(ends, starts + 1)
    if mode == "last":
        return torch.maximum(ends - 1, starts), ends
    return starts, ends


def pool_forward(hidden, starts, ends, weighted, out_dtype):
    """Triton segment pooling: hidden [T, H], starts/ends int32 [B] -> [B, H] in out_dtype (fp32 accumulation)."""
    T, H = hidden.shape
    B = starts.numel()
    cfg = pooling_config(hidden.device, T, B, H)
    splits = cfg["splits"]
    chunk = triton.cdiv(triton.cdiv(max(T, 1), splits), cfg["fwd_br"]) * cfg["fwd_br"]
    # One split writes the output directly (a fresh tensor, not a view: custom-op outputs must not be views).
    buf = _alloc((B, H) if splits == 1 else (splits, B, H), out_dtype if splits == 1 else torch.float32,
                 hidden.device)
    if B > 0 and H > 0:
        _pool_fwd_kernel[(B, triton.cdiv(H, cfg["fwd_bh"]), splits)](
            hidden, starts, ends, buf, hidden.stride(0), 0 if splits == 1 else buf.stride(0), buf.stride(-2), B, H,
            chunk,
            WEIGHTED=weighted, BR=cfg["fwd_br"], BH=cfg["fwd_bh"], num_warps=cfg["fwd_warps"],
        )
    return buf if splits == 1 else buf.sum(0).to(out_dtype)


def pool_backward(dout, hidden_shape, hidden_dtype, starts, ends, weighted):
    """Gradient of `pool_forward`: dout [B, H] -> d hidden [T, H] (zero for rows outside every range)."""
    T, H = hidden_shape
    B = starts.numel()
    cfg = pooling_config(dout.device, T, B, H)
    dout = dout.contiguous()
    dx = _alloc((T, H), hidden_dtype, dout.device)
    if T > 0 and H > 0:
        _pool_bwd_kernel[(triton.cdiv(T, cfg["bwd_br"]), triton.cdiv(H, cfg["bwd_bh"]))](
            dout, starts, ends, dx, dout.stride(0), dx.stride(0), T, B, H,
            WEIGHTED=weighted, BR=cfg["bwd_br"], BH=cfg["bwd_bh"], BB=cfg["bwd_bb"],
            num_warps=cfg["bwd_warps"],
        )
    return dx


# The Triton path as torch.library custom ops (fake implementations for torch.compile, the Triton backward for
# autograd).


@torch.library.custom_op("llm2vec_fast_triton::segment_pool_forward", mutates_args=())
def segment_pool_forward_op(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, weighted: bool,
                            out_dtype: torch.dtype) -> torch.Tensor:
    """Triton segment pooling as a custom op: ``[B, H]`` in ``out_dtype``."""
    return pool_forward(hidden, starts, ends, weighted, out_dtype)


@segment_pool_forward_op.register_fake
def _(hidden, starts, ends, weighted, out_dtype):
    return hidden.new_empty((starts.shape[0], hidden.shape[1]), dtype=out_dtype)


@torch.library.custom_op("llm2vec_fast_triton::segment_pool_backward", mutates_args=())
def segment_pool_backward_op(dout: torch.Tensor, rows: int, hidden_dtype: torch.dtype, starts: torch.Tensor,
                             ends: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Gradient of ``segment_pool_forward`` as a custom op: ``[rows, H]`` in ``hidden_dtype``."""
    return pool_backward(dout, (rows, dout.shape[1]), hidden_dtype, starts, ends, weighted)


@segment_pool_backward_op.register_fake
def _(dout, rows, hidden_dtype, starts, ends, weighted):
    return dout.new_empty((rows, dout.shape[1]), dtype=hidden_dtype)


def _pool_setup_context(ctx, inputs, output):
    hidden, starts, ends, weighted, _ = inputs
    ctx.save_for_backward(starts, ends)
    ctx.weighted, ctx.rows, ctx.hidden_dtype = weighted, hidden.shape[0], hidden.dtype


def _pool_backward(ctx, dout):
    starts, ends = ctx.saved_tensors
    return segment_pool_backward_op(dout, ctx.rows, ctx.hidden_dtype, starts, ends, ctx.weighted), None, None, \
        None, None


segment_pool_forward_op.register_autograd(_pool_backward, setup_context=_pool_setup_context)


def _torch_segment_pool(hidden, starts, ends, weighted, out_dtype):
    """Vectorised PyTorch path (no loop over segments): expand the ranges into (segment, row, weight) triples,
    gather the rows once and index_add them in fp32."""
    B, H = starts.numel(), hidden.shape[1]
    s, e = starts.long(), ends.long()
    L = (e - s).clamp(min=0)
    total = int(L.sum())
    seg = torch.repeat_interleave(torch.arange(B, device=hidden.device), L, output_size=total)
    j = torch.arange(total, device=hidden.device) - (torch.cumsum(L, 0) - L)[seg]  # position within the range
    Lf = L.to(torch.float32)[seg]
    w = (j + 1).to(torch.float32) / (Lf * (Lf + 1) / 2) if weighted else 1.0 / Lf
    rows = hidden.index_select(0, s[seg] + j).to(torch.float32) * w[:, None]
    out = torch.zeros(B, H, dtype=torch.float32, device=hidden.device).index_add(0, seg, rows)
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def segment_pool(hidden, starts, ends, mode="mean", out_dtype=None, *, force_triton=False):
    """Pool row ranges of packed hidden states.

    hidden: [T, H] float (any dtype; the last dim is made contiguous). starts, ends: int tensors [B] on
    hidden's device, range i = rows [starts[i], ends[i]) (ranges may overlap; an empty range gives a zero row).
    mode: one of POOLING_MODES. out_dtype: default hidden's dtype; accumulation is fp32.
    CUDA tensors (or force_triton=True) run the Triton kernels, CPU tensors a vectorised PyTorch path.
    Returns [B, H]; differentiable w.r.t. hidden (rows outside every range get zero gradient).
    """
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got {tuple(hidden.shape)}")
    out_dtype = out_dtype or hidden.dtype
    starts, ends = _mode_ranges(starts, ends, mode)
    weighted = mode == "weighted_mean"
    if hidden.device.type != "cuda" and not force_triton:
        return _torch_segment_pool(hidden, starts, ends, weighted, out_dtype)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    require_triton("segment_pool on a CUDA tensor")
    starts, ends = starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous()
    return segment_pool_forward_op(hidden, starts, ends, weighted, out_dtype)


def naive_segment_pool(hidden, starts, ends, mode="mean"):
    """Reference: a Python loop over segments in hidden's dtype (run it in float64 for ground truth)."""
    rows = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        x = hidden[s:e] if e > s else hidden[:0]
        if len(x) == 0:
            rows.append(x.sum(0))  # zeros, still attached to the graph
        elif mode == "mean":
            rows.append(x.mean(0))
        elif mode == "weighted_mean":
            w = torch.arange(1, len(x) + 1, dtype=hidden.dtype, device=hidden.device)
            rows.append((x * (w / w.sum())[:, None]).sum(0))
        elif mode == "first":
            rows.append(x[0])
        elif mode == "last":
            rows.append(x[-1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.stack(rows) if rows else hidden.new_zeros(0, hidden.shape[1])
