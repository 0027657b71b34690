"""Bidirectional (non-causal) flash attention over packed variable-length sequences.

Layout: ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` hold the tokens of all sequences back to back;
``cu_seqlens`` (int32 ``[B+1]``) marks sequence ``i`` as rows ``cu_seqlens[i]:cu_seqlens[i+1]``. Every token
attends to every token of its own sequence and to nothing else. Grouped-query attention (``Hq`` a multiple of
``Hkv``) reads the shared K/V head directly; K/V are never repeated in memory.

The file holds, in order: the Triton kernels (forward, backward preprocess, dK/dV, dQ, dropout-mask debug
kernel), the launch configuration, the host functions, the autograd Function, the PyTorch path for CPU tensors,
the public entry points and the naive reference. ``kernels/README.md`` has the maths and the dropout RNG scheme.
"""

import math
import os

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, require_triton, tl, triton

# Tests set this to True: outputs are then allocated NaN-filled, so an element a kernel never writes fails loudly.
POISON_OUTPUTS = False

LOG2E = 1.4426950408889634


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _alloc(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


# The kernels exist only where Triton is installed (the gpu extra); the CPU paths below never need them.
if HAS_TRITON:

    @triton.jit
    def _dropout_keep(seed, offset, i_h, b_tok, b_col, dropout_p):
        """Keep-mask of attention dropout for query tokens ``b_tok`` (packed row index) and keys ``b_col`` (index
        within the sequence), both int32 blocks of one shape, for query head ``i_h``. One Philox draw per element,
        keyed by the 64-bit seed, counters (col, token, head, offset): the forward, both backward kernels and the
        debug mask kernel regenerate bit-identical masks whatever their tiling."""
        b_r, _, _, _ = tl.philox(seed, b_col, b_tok, b_col * 0 + i_h, b_col * 0 + offset)
        return tl.uint_to_uniform_float(b_r) > dropout_p


    @triton.jit(do_not_specialize=["T", "NM"])
    def _attn_fwd_kernel(
        q, k, v, o, lse, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        T, NM, scale_log2, dropout_p, inv_keep,
        HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program: BM query rows of one (sequence, query head); grid = NM * B * HQ, query block fastest so that
        # programs running together share the K/V of one head in L2.
        pid = tl.program_id(0).to(tl.int64)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_kh = i_h // GROUP
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos
        if i_m * BM >= L:
            return

        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        m_m = o_m < L
        m_d = o_d < D
        p_q = q + (bos + o_m)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :]
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        p_k = k + bos * stride_kt + i_kh * stride_kh + o_n[None, :] * stride_kt + o_d[:, None]
        p_v = v + bos * stride_vt + i_kh * stride_vh + o_n[:, None] * stride_vt + o_d[None, :]
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            b_tok = (bos + o_m).to(tl.int32)[:, None] + tl.zeros([BM, BN], tl.int32)  # [BM, BN]

        b_m = tl.full([BM], float("-inf"), tl.float32)
        b_l = tl.zeros([BM], tl.float32)
        b_acc = tl.zeros([BM, BD], tl.float32)
        for start_n in range(0, L, BN):
            m_n = (start_n + o_n) < L
            b_k = tl.load(p_k + start_n * stride_kt, mask=m_n[None, :] & m_d[:, None], other=0.0)  # [BD, BN]
            b_s = tl.dot(b_q, b_k, input_precision=PRECISION) * scale_log2  # [BM, BN]
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            # A row whose keys are all masked keeps m = -inf; exponentiate against 0 instead so it stays 0, not NaN.
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            b_p = tl.exp2(b_s - b_m_safe[:, None])  # [BM, BN]
            b_alpha = tl.exp2(b_m - b_m_safe)  # [BM]
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            if HAS_DROPOUT:
                b_col = (start_n + o_n).to(tl.int32)[None, :] + tl.zeros([BM, BN], tl.int32)
                b_keep = _dropout_keep(seed, offset, i_h.to(tl.int32), b_tok, b_col, dropout_p)
                b_p = tl.where(b_keep, b_p * inv_keep, 0.0)
            b_v = tl.load(p_v + start_n * stride_vt, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
            b_m = b_m_new

        b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_l = tl.where(b_l == 0.0, 1.0, b_l)
        b_o = b_acc / b_l[:, None]  # [BM, BD]
        p_o = o + (bos + o_m)[:, None] * stride_ot + i_h * stride_oh + o_d[None, :]
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
        # Log-sum-exp in base 2 of the scaled logits: p = exp2(s * scale_log2 - lse) in the backward.
        tl.store(lse + i_h * T + bos + o_m, b_m + tl.log2(b_l), mask=m_m)


    @triton.jit(do_not_specialize=["T"])
    def _attn_bwd_preprocess_kernel(
        o, do, delta, stride_ot, stride_oh, stride_dot, stride_doh, T,
        D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
    ):
        i_t = tl.program_id(0).to(tl.int64)
        i_h = tl.program_id(1).to(tl.int64)
        o_t = i_t * BT + tl.arange(0, BT)
        o_d = tl.arange(0, BD)
        m_t = o_t < T
        m_td = m_t[:, None] & (o_d < D)[None, :]
        b_o = tl.load(o + o_t[:, None] * stride_ot + i_h * stride_oh + o_d[None, :], mask=m_td, other=0.0)  # [BT, BD]
        b_do = tl.load(do + o_t[:, None] * stride_dot + i_h * stride_doh + o_d[None, :],
                       mask=m_td, other=0.0)  # [BT, BD]
        b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BT]
        tl.store(delta + i_h * T + o_t, b_delta, mask=m_t)


    @triton.jit(do_not_specialize=["T", "NN"])
    def _attn_bwd_dkdv_kernel(
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        T, NN, scale, scale_log2, dropout_p, inv_keep,
        HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program: BN keys of one (sequence, KV head); it loops over the GROUP query heads sharing that KV head
        # and over all query blocks, so the GQA sum happens in registers and every dK/dV element has one writer.
        pid = tl.program_id(0).to(tl.int64)
        i_n = pid % NN
        i_bh = pid // NN
        i_b = i_bh // HKV
        i_kh = i_bh % HKV
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos
        if i_n * BN >= L:
            return

        o_n = i_n * BN + tl.arange(0, BN)
        o_m = tl.arange(0, BM)
        o_d = tl.arange(0, BD)
        m_n = o_n < L
        m_d = o_d < D
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k + (bos + o_n)[:, None] * stride_kt + i_kh * stride_kh + o_d[None, :],
                      mask=m_nd, other=0.0)  # [BN, BD]
        b_v = tl.load(v + (bos + o_n)[:, None] * stride_vt + i_kh * stride_vh + o_d[None, :],
                      mask=m_nd, other=0.0)  # [BN, BD]
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            b_col = o_n.to(tl.int32)[:, None] + tl.zeros([BN, BM], tl.int32)  # [BN, BM]

        b_dk = tl.zeros([BN, BD], tl.float32)
        b_dv = tl.zeros([BN, BD], tl.float32)
        for g in range(GROUP):
            i_h = i_kh * GROUP + g
            p_q = q + (bos + o_m)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :]
            p_do = do + (bos + o_m)[:, None] * stride_dot + i_h * stride_doh + o_d[None, :]
            p_lse = lse + i_h * T + bos + o_m
            p_delta = delta + i_h * T + bos + o_m
            for start_m in range(0, L, BM):
                m_m = (start_m + o_m) < L
                m_md = m_m[:, None] & m_d[None, :]
                b_q = tl.load(p_q + start_m * stride_qt, mask=m_md, other=0.0)  # [BM, BD]
                b_do = tl.load(p_do + start_m * stride_dot, mask=m_md, other=0.0)  # [BM, BD]
                b_lse = tl.load(p_lse + start_m, mask=m_m, other=0.0)  # [BM]
                b_delta = tl.load(p_delta + start_m, mask=m_m, other=0.0)  # [BM]
                b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * scale_log2  # [BN, BM]
                # Padding query rows (beyond L) must contribute nothing; their lse was never written.
                b_pT = tl.where(m_m[None, :], tl.exp2(b_sT - b_lse[None, :]), 0.0)  # [BN, BM]
                b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
                if HAS_DROPOUT:
                    b_tok = (bos + start_m + o_m).to(tl.int32)[None, :] + tl.zeros([BN, BM], tl.int32)
                    b_keep = _dropout_keep(seed, offset, i_h.to(tl.int32), b_tok, b_col, dropout_p)
                    b_pdT = tl.where(b_keep, b_pT * inv_keep, 0.0)
                    b_dpT = tl.where(b_keep, b_dpT * inv_keep, 0.0)
                else:
                    b_pdT = b_pT
                b_dv += tl.dot(b_pdT.to(b_do.dtype), b_do, input_precision=PRECISION)
                b_dsT = b_pT * (b_dpT - b_delta[None, :])  # [BN, BM]
                b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=PRECISION)

        b_dk = b_dk * scale
        tl.store(dk + (bos + o_n)[:, None] * stride_dkt + i_kh * stride_dkh + o_d[None, :],
                 b_dk.to(dk.dtype.element_ty), mask=m_nd)
        tl.store(dv + (bos + o_n)[:, None] * stride_dvt + i_kh * stride_dvh + o_d[None, :],
                 b_dv.to(dv.dtype.element_ty), mask=m_nd)


    @triton.jit(do_not_specialize=["T", "NM"])
    def _attn_bwd_dq_kernel(
        q, k, v, do, lse, delta, dq, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
        T, NM, scale, scale_log2, dropout_p, inv_keep,
        HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_kh = i_h // GROUP
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos
        if i_m * BM >= L:
            return

        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        m_m = o_m < L
        m_d = o_d < D
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(q + (bos + o_m)[:, None] * stride_qt + i_h * stride_qh + o_d[None, :],
                      mask=m_md, other=0.0)  # [BM, BD]
        b_do = tl.load(do + (bos + o_m)[:, None] * stride_dot + i_h * stride_doh + o_d[None, :],
                       mask=m_md, other=0.0)  # [BM, BD]
        b_lse = tl.load(lse + i_h * T + bos + o_m, mask=m_m, other=0.0)  # [BM]
        b_delta = tl.load(delta + i_h * T + bos + o_m, mask=m_m, other=0.0)  # [BM]
        p_kT = k + bos * stride_kt + i_kh * stride_kh + o_n[None, :] * stride_kt + o_d[:, None]
        p_vT = v + bos * stride_vt + i_kh * stride_vh + o_n[None, :] * stride_vt + o_d[:, None]
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            b_tok = (bos + o_m).to(tl.int32)[:, None] + tl.zeros([BM, BN], tl.int32)  # [BM, BN]

        b_dq = tl.zeros([BM, BD], tl.float32)
        for start_n in range(0, L, BN):
            m_n = (start_n + o_n) < L
            m_dn = m_d[:, None] & m_n[None, :]
            b_kT = tl.load(p_kT + start_n * stride_kt, mask=m_dn, other=0.0)  # [BD, BN]
            b_vT = tl.load(p_vT + start_n * stride_vt, mask=m_dn, other=0.0)  # [BD, BN]
            b_s = tl.dot(b_q, b_kT, input_precision=PRECISION) * scale_log2  # [BM, BN]
            b_p = tl.where(m_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)  # [BM, BN]
            b_dp = tl.dot(b_do, b_vT, input_precision=PRECISION)  # [BM, BN]
            if HAS_DROPOUT:
                b_col = (start_n + o_n).to(tl.int32)[None, :] + tl.zeros([BM, BN], tl.int32)
                b_keep = _dropout_keep(seed, offset, i_h.to(tl.int32), b_tok, b_col, dropout_p)
                b_dp = tl.where(b_keep, b_dp * inv_keep, 0.0)
            b_ds = b_p * (b_dp - b_delta[:, None])  # [BM, BN]
            b_dq += tl.dot(b_ds.to(b_kT.dtype), tl.trans(b_kT), input_precision=PRECISION)

        b_dq = b_dq * scale
        tl.store(dq + (bos + o_m)[:, None] * stride_dqt + i_h * stride_dqh + o_d[None, :],
                 b_dq.to(dq.dtype.element_ty), mask=m_md)


    @triton.jit(do_not_specialize=["NM"])
    def _dropout_mask_kernel(
        mask, cu_seqlens, rng, stride_mb, stride_mh, stride_mm, NM, dropout_p,
        HQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1).to(tl.int64) - bos
        if i_m * BM >= L:
            return
        seed = tl.load(rng)
        offset = tl.load(rng + 1).to(tl.int32)
        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        b_tok = (bos + o_m).to(tl.int32)[:, None] + tl.zeros([BM, BN], tl.int32)  # [BM, BN]
        p_mask = mask + i_b * stride_mb + i_h * stride_mh + o_m[:, None] * stride_mm
        for start_n in range(0, L, BN):
            b_col = (start_n + o_n).to(tl.int32)[None, :] + tl.zeros([BM, BN], tl.int32)
            b_keep = _dropout_keep(seed, offset, i_h.to(tl.int32), b_tok, b_col, dropout_p)
            m_mn = (o_m < L)[:, None] & ((start_n + o_n) < L)[None, :]
            tl.store(p_mask + (start_n + o_n)[None, :], b_keep.to(tl.int8), mask=m_mn)


# --------------------------------------------------------------------------------------------------------------
# Launch configuration: every block size, warp count and pipeline depth is chosen here.
# --------------------------------------------------------------------------------------------------------------

# Benchmarks may set this to a dict with any of the keys below to try other tilings; None = the defaults.
CONFIG_OVERRIDE = None


def attention_config(device, head_dim):
    """Tiling for one head dim on one device: forward (fwd_bm x fwd_bn), dK/dV (bwd_bm query rows per step,
    bwd_bn keys per program), dQ (dq_bm rows per program, dq_bn keys per step)."""
    bd = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda" or _interpreting():
        # The interpreter costs ~5 ms per (program x loop step) whatever the block: few, mid-sized blocks.
        cfg = dict(fwd_bm=32, fwd_bn=32, bwd_bm=32, bwd_bn=32, dq_bm=32, dq_bn=32,
                   fwd_warps=4, fwd_stages=1, bwd_warps=4, bwd_stages=1)
    elif bd <= 64:
        cfg = dict(fwd_bm=128, fwd_bn=64, bwd_bm=32, bwd_bn=128, dq_bm=128, dq_bn=32,
                   fwd_warps=4, fwd_stages=3, bwd_warps=4, bwd_stages=3)
    elif bd <= 128:
        # Hopper/Ampere: 128x64 score tiles with 8 warps keep the fp32 accumulator [128, 128] in registers.
        cfg = dict(fwd_bm=128, fwd_bn=64, bwd_bm=32, bwd_bn=128, dq_bm=128, dq_bn=32,
                   fwd_warps=8, fwd_stages=3, bwd_warps=8, bwd_stages=2)
    else:
        # Head dims 129..256 (padded to 256): correct, not tuned; smaller tiles to fit registers and shared memory.
        cfg = dict(fwd_bm=64, fwd_bn=32, bwd_bm=32, bwd_bn=64, dq_bm=64, dq_bn=32,
                   fwd_warps=8, fwd_stages=2, bwd_warps=8, bwd_stages=1)
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    cfg["bd"] = bd
    return cfg


def _precision(dtype):
    # fp32 inputs get true fp32 dots (TF32 would break the accuracy contract); fp16/bf16 use tensor cores anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, cu_seqlens):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("q, k, v must be [T, H, D]")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype, or run "
                         "under torch.autocast, which casts them to its dtype as it does for SDPA")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if q.shape[2] > 256:
        raise ValueError(f"head dim {q.shape[2]} > 256 is not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [B+1]")


def _autocast_inputs(q, k, v):
    """q, k, v as SDPA receives them: while torch.autocast is on for their device, every floating tensor but
    float64 is cast to the autocast dtype (fp32 weights with bf16 autocast leave rotated q/k in fp32 and v in
    bf16); otherwise they are unchanged, and mixed dtypes are refused, as SDPA refuses them."""
    device_type = q.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))


def _lastdim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------------------------


def draw_dropout_rng(device, generator=None):
    """The (seed, offset) pair of one dropout call, an int64 tensor [2] on ``device``, drawn from torch's
    default generator of that device (or ``generator``) without a host sync. Replaying the generator's state
    (GradCache) replays the draw, hence the masks."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device, generator=generator)


def attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p=0.0, rng=None):
    """Triton forward. Returns ``out [T, Hq, D]`` and the base-2 log-sum-exp ``lse [Hq, T]`` (fp32)."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    cfg = attention_config(q.device, D)
    o = _alloc((T, HQ, D), q.dtype, q.device)
    lse = _alloc((HQ, T), torch.float32, q.device)
    has_dropout = dropout_p > 0.0
    NM = triton.cdiv(max(max_seqlen, 1), cfg["fwd_bm"])
    grid = (NM * B * HQ,)
    if grid[0] == 0 or T == 0:
        return o, lse
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, rng if has_dropout else cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        T, NM, softmax_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
        HQ=HQ, GROUP=HQ // HKV, D=D, BD=cfg["bd"], BM=cfg["fwd_bm"], BN=cfg["fwd_bn"],
        HAS_DROPOUT=has_dropout, PRECISION=_precision(q.dtype),
        num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p=0.0, rng=None):
    """Triton backward: delta = rowsum(dO * O), then dK/dV (GQA summed in-kernel) and dQ. No atomics."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    cfg = attention_config(q.device, D)
    do = _lastdim_contiguous(do)
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if T == 0 or B == 0:
        return dq, dk, dv
    delta = _alloc((HQ, T), torch.float32, q.device)
    BT = 64 if cfg["bd"] <= 128 else 32
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, BT), HQ)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T, D=D, BD=cfg["bd"], BT=BT,
    )
    has_dropout = dropout_p > 0.0
    rng = rng if has_dropout else cu_seqlens
    common = dict(D=D, BD=cfg["bd"], HAS_DROPOUT=has_dropout, PRECISION=_precision(q.dtype),
                  num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    scalars = (softmax_scale, softmax_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p))
    NN = triton.cdiv(max(max_seqlen, 1), cfg["bwd_bn"])
    _attn_bwd_dkdv_kernel[(NN * B * HKV,)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, rng,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        T, NN, *scalars,
        HKV=HKV, GROUP=HQ // HKV, BM=cfg["bwd_bm"], BN=cfg["bwd_bn"], **common,
    )
    NM = triton.cdiv(max(max_seqlen, 1), cfg["dq_bm"])
    _attn_bwd_dq_kernel[(NM * B * HQ,)](
        q, k, v, do, lse, delta, dq, cu_seqlens, rng,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        T, NM, *scalars,
        HQ=HQ, GROUP=HQ // HKV, BM=cfg["dq_bm"], BN=cfg["dq_bn"], **common,
    )
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd of the Triton varlen attention: forward saves (q, k, v, out, lse, rng); the backward regenerates
    the dropout masks from rng and runs the split dK/dV and dQ kernels."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng):
        o, lse = attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, rng)
        ctx.max_seqlen, ctx.softmax_scale, ctx.dropout_p = max_seqlen, softmax_scale, dropout_p
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, rng = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale,
                                        ctx.dropout_p, rng)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# PyTorch path for CPU tensors
# --------------------------------------------------------------------------------------------------------------


# Padded tokens allowed per real token when sequences of different lengths share one SDPA call on CPU.
CPU_PADDING_SLACK = 1.25


def _length_groups(lengths, slack=CPU_PADDING_SLACK):
    """Sequence indices grouped (longest first) so that each group's padded size, count x its longest length,
    stays within `slack` x its real token count. Zero-length sequences are left out (nothing to compute)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups, current, real = [], [], 0
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > slack * (real + lengths[i]):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        groups.append(current)
    return groups


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p):
    """CPU path: sequences of similar length are re-padded together into [G, H, S, D] and run through one SDPA
    call with a key-padding mask (none when a group's lengths are equal); the outputs are scattered back.
    Grouping bounds the padding, which a single re-pad to max_seqlen would make quadratic in the longest text
    (benchmarks/bench_kernels.py, bench_encode.py). Differentiable; dropout from torch's CPU generator."""
    T, HQ, D = q.shape
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    outputs, rows_all = [], []
    for group in _length_groups(lengths):
        S = lengths[group[0]]
        group_lengths = torch.tensor([lengths[i] for i in group], device=q.device)
        group_starts = torch.tensor([starts[i] for i in group], device=q.device)
        G = len(group)
        # Token rows of the group in padded order, and where each lands in the [G * S] layout.
        seg = torch.repeat_interleave(torch.arange(G, device=q.device), group_lengths)
        within = torch.arange(seg.numel(), device=q.device) - (torch.cumsum(group_lengths, 0) - group_lengths)[seg]
        rows = group_starts[seg] + within
        slots = seg * S + within

        def pad(x):
            x = x.index_select(0, rows)
            if slots.numel() != G * S:
                x = x.new_zeros(G * S, x.shape[1], D).index_copy(0, slots, x)
            return x.view(G, S, x.shape[1], D).transpose(1, 2)

        mask = None
        if slots.numel() != G * S:
            mask = (torch.arange(S, device=q.device)[None, :] < group_lengths[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p,
                                             scale=softmax_scale, enable_gqa=HQ != k.shape[1])  # [G, HQ, S, D]
        out = out.transpose(1, 2).reshape(G * S, HQ, D)
        outputs.append(out if slots.numel() == G * S else out.index_select(0, slots))
        rows_all.append(rows)
    if not outputs:  # T == 0: nothing to attend
        return q * 0
    # Every token belongs to a non-empty sequence, so each of the T rows is written exactly once.
    return q.new_empty(T, HQ, D).index_copy(0, torch.cat(rows_all), torch.cat(outputs))


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0, *,
                     deterministic=True, force_triton=False):
    """Bidirectional attention within each packed sequence.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (Hq a multiple of Hkv, D <= 256), fp16/bf16/fp32, last dim contiguous.
    cu_seqlens: int32 [B+1], cumulative sequence starts, cu_seqlens[-1] == T; zero-length entries allowed.
    max_seqlen: python int >= every length (sizes the grid; never read back from the device; a smaller value
        leaves rows uncomputed).
    softmax_scale: default 1/sqrt(D). dropout_p: probability of dropping an attention probability (train only).
    deterministic: accepted for API compatibility; the Triton backward is always deterministic (no atomics).
    force_triton: run the Triton kernels on CPU tensors too (Triton interpreter, for tests).
    Under torch.autocast, q, k, v are first cast to the autocast dtype as SDPA casts them (float64 excepted).
    Returns out [T, Hq, D] in q's dtype (the autocast dtype under autocast); differentiable w.r.t. q, k, v.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_inputs(q, k, v, cu_seqlens)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.device.type != "cuda" and not force_triton:
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p)
    require_triton("varlen_attention on a CUDA tensor")
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    cu_seqlens = cu_seqlens.to(torch.int32)
    rng = draw_dropout_rng(q.device) if dropout_p > 0.0 else None
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), rng)


def varlen_attention_dropout_mask(cu_seqlens, max_seqlen, num_heads, dropout_p, *, rng=None, device=None):
    """Debug path: the exact keep-masks the Triton kernels apply for one call.

    With ``rng=None`` the (seed, offset) pair is drawn from torch's default generator of ``device`` exactly as
    ``varlen_attention`` draws it, so ``torch.manual_seed(s); varlen_attention(...)`` and
    ``torch.manual_seed(s); varlen_attention_dropout_mask(...)`` see the same masks. Returns a list with one
    bool tensor [num_heads, L_i, L_i] per sequence (True = kept).
    """
    require_triton("varlen_attention_dropout_mask")
    device = torch.device(device) if device is not None else cu_seqlens.device
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if rng is None:
        rng = draw_dropout_rng(device)
    B = cu_seqlens.numel() - 1
    S = max(int(max_seqlen), 1)
    BM = BN = 32
    mask = torch.zeros((B, num_heads, S, S), dtype=torch.int8, device=device)
    NM = triton.cdiv(S, BM)
    if B > 0:
        _dropout_mask_kernel[(NM * B * num_heads,)](
            mask, cu_seqlens, rng, mask.stride(0), mask.stride(1), mask.stride(2), NM, float(dropout_p),
            HQ=num_heads, BM=BM, BN=BN,
        )
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return [mask[i, :, :n, :n].bool() for i, n in enumerate(lengths)]


def naive_varlen_attention(q, k, v, cu_seqlens, softmax_scale=None, dropout_mask=None, *, dropout_p=None):
    """Reference: a plain loop over sequences, softmax(q k^T * scale) v per sequence, in the inputs' dtype (run
    it in float64 for ground truth). dropout_mask: optional list of per-sequence [Hq, L, L] masks applied to the
    probabilities, either float (already 0 or 1/(1-p)) or bool keep-masks with ``dropout_p`` given."""
    T, HQ, D = q.shape
    G = HQ // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    bounds = cu_seqlens.tolist()
    outs = []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        qi = q[s:e].transpose(0, 1)  # [HQ, L, D]
        ki = k[s:e].transpose(0, 1).repeat_interleave(G, 0)
        vi = v[s:e].transpose(0, 1).repeat_interleave(G, 0)
        p = torch.softmax((qi @ ki.transpose(1, 2)) * scale, dim=-1)  # [HQ, L, L]
        if dropout_mask is not None:
            m = dropout_mask[i].to(q.device)
            if m.dtype == torch.bool:
                m = m.to(p.dtype) / (1.0 - dropout_p)
            p = p * m.to(p.dtype)
        outs.append((p @ vi).transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros(0, HQ, D)
