"""Flash attention over packed variable-length sequences: bidirectional by default, optionally causal, with a
sliding window, with soft-capped logits.

Layout: ``q [T, Hq, D]``, ``k``/``v`` ``[T, Hkv, D]`` hold the tokens of all sequences back to back;
``cu_seqlens`` (int32 ``[B+1]``) marks sequence ``i`` as rows ``cu_seqlens[i]:cu_seqlens[i+1]``. Every token
attends to the tokens of its own sequence (all of them, or those causality and the window leave) and to nothing
else. Grouped-query attention (``Hq`` a multiple of ``Hkv``) reads the shared K/V head directly; K/V are never
repeated in memory. Causality, the window and the soft cap are compile-time branches of the kernels (``CAUSAL``,
``WINDOW``, ``SOFTCAP``): off, they cost nothing.

The file holds, in order: the Triton kernels (forward, backward preprocess, dK/dV, dQ, dropout-mask debug
kernel), the launch configuration, the host functions, the custom ops with their autograd, the PyTorch path for
CPU tensors, the public entry points and the naive reference. ``kernels/README.md`` has the maths and the dropout
RNG scheme.
"""

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import _alloc, _interpreting
from .. import settings
from ._triton import HAS_TRITON, require_triton, tl, triton

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------


# The kernels exist only where Triton is installed (the gpu extra); the CPU paths below never need them.
if HAS_TRITON:

    @triton.jit
    def _dropout_keep(seed, offset, head, o_tok, col_start, dropout_p, BN: tl.constexpr):
        """Keep-mask ``[BM, BN]`` of attention dropout for query tokens ``o_tok [BM]`` (packed row indices, int32)
        and the BN keys from ``col_start`` (index within the sequence, even) of query head ``head``. One Philox4x32
        draw per (token, pair of keys), keyed by the 64-bit seed with counters (key pair, token, head, offset):
        its words 0 and 1 decide the even and the odd key. The forward, both backward kernels and the debug mask
        kernel call this with the same arguments, so they regenerate bit-identical masks whatever their tiling."""
        o_pair = col_start // 2 + tl.arange(0, BN // 2)  # [BN/2]
        c_tok = o_tok[:, None] + tl.zeros([1, BN // 2], tl.int32)  # [BM, BN/2]
        c_pair = o_pair[None, :] + tl.zeros_like(c_tok)  # [BM, BN/2]
        r0, r1, _, _ = tl.philox(seed, c_pair, c_tok, tl.zeros_like(c_tok) + head, tl.zeros_like(c_tok) + offset)
        keep = tl.join(tl.uint_to_uniform_float(r0) > dropout_p, tl.uint_to_uniform_float(r1) > dropout_p)
        return tl.reshape(keep, [o_tok.shape[0], BN])  # [BM, BN]: key 2j + w is word w of pair j


    @triton.jit
    def _dropout_keep_t(seed, offset, head, o_tok, col_start, dropout_p, BN: tl.constexpr):
        """``_dropout_keep`` transposed, ``[BN, BM]`` (keys x tokens), for the dK/dV kernel's layout: the same
        Philox draws, generated in that orientation rather than transposed in registers (which spilled)."""
        o_pair = col_start // 2 + tl.arange(0, BN // 2)  # [BN/2]
        c_pair = o_pair[:, None] + tl.zeros([1, o_tok.shape[0]], tl.int32)  # [BN/2, BM]
        c_tok = o_tok[None, :] + tl.zeros_like(c_pair)  # [BN/2, BM]
        r0, r1, _, _ = tl.philox(seed, c_pair, c_tok, tl.zeros_like(c_tok) + head, tl.zeros_like(c_tok) + offset)
        keep = tl.join(tl.uint_to_uniform_float(r0) > dropout_p, tl.uint_to_uniform_float(r1) > dropout_p)
        return tl.reshape(tl.permute(keep, (0, 2, 1)), [BN, o_tok.shape[0]])  # [BN, BM]


    @triton.jit
    def _tanh(x):
        """tanh from exp2: triton.language has no tanh, and libdevice's does not run in the interpreter.
        1 - 2 / (e^2x + 1) saturates to +-1 without overflow (e^2x = inf gives 1); absolute error ~ an ulp of 1."""
        return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


    @triton.jit
    def _in_band(i, j, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
        """Which (query, key) pairs may attend, from query positions ``i`` and key positions ``j`` (within the
        sequence; a row and a column vector, broadcast against each other): ``j <= i`` when CAUSAL,
        ``|i - j| < WINDOW`` when WINDOW > 0. Only called when one is set. The window is added to the vectors,
        so no [rows, cols] integer tile is formed."""
        if CAUSAL:
            keep = i >= j
            if WINDOW > 0:
                keep = keep & (i < j + WINDOW)
        else:
            keep = (i < j + WINDOW) & (i > j - WINDOW)
        return keep


    @triton.jit
    def _band_keys(start, rows, L, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, B: tl.constexpr):
        """The key range ``[lo, hi)`` that query rows ``[start, start + rows)`` of a sequence of length L can see,
        ``lo`` rounded down to a multiple of the key block B (so blocks, and the dropout's key pairs, stay
        aligned). Key blocks outside it are never visited: that is where a sliding window (or causality) saves
        work. Blocks inside it are still masked elementwise by ``_in_band``."""
        lo = 0
        hi = L
        if WINDOW > 0:
            lo = tl.maximum(start - WINDOW + 1, 0)
            hi = tl.minimum(hi, start + rows - 1 + WINDOW)
        if CAUSAL:
            hi = tl.minimum(hi, start + rows)
        return (lo // B) * B, hi


    @triton.jit
    def _band_queries(start, cols, L, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, B: tl.constexpr):
        """The query range ``[lo, hi)`` that sees keys ``[start, start + cols)``, lo rounded down to a multiple of
        the query block B (the dK/dV kernel's loop)."""
        lo = 0
        hi = L
        if WINDOW > 0:
            lo = tl.maximum(start - WINDOW + 1, 0)
            hi = tl.minimum(hi, start + cols - 1 + WINDOW)
        if CAUSAL:
            lo = tl.maximum(lo, start)
        return (lo // B) * B, hi


    @triton.jit
    def _fwd_step(b_q, b_m, b_l, b_acc, p_k, p_v, start_n, L, o_m, o_n, m_d, stride_kt, stride_vt,
                  seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep, softcap_scale, softcap_log2,
                  BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LAST: tl.constexpr,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        # One key block of the online softmax. Only the LAST block of a sequence can run past its end, so only
        # it pays for the key mask; the full blocks before it load and compute unmasked (head-dim mask aside).
        if LAST:
            m_n = (start_n + o_n) < L
            b_k = tl.load(p_k + start_n * stride_kt, mask=m_n[None, :] & m_d[:, None], other=0.0)  # [BD, BN]
            b_v = tl.load(p_v + start_n * stride_vt, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        else:
            b_k = tl.load(p_k + start_n * stride_kt, mask=m_d[:, None], other=0.0)  # [BD, BN]
            b_v = tl.load(p_v + start_n * stride_vt, mask=m_d[None, :], other=0.0)  # [BN, BD]
        b_s = tl.dot(b_q, b_k, input_precision=PRECISION)  # [BM, BN]
        if SOFTCAP:
            # Base-2 logits c * tanh(scale * qk / c): softcap_scale = scale / c, softcap_log2 = c * log2(e).
            b_s = _tanh(b_s * softcap_scale) * softcap_log2
        else:
            b_s = b_s * scale_log2
        if CAUSAL or WINDOW > 0:
            b_s = tl.where(_in_band(o_m[:, None], (start_n + o_n)[None, :], CAUSAL, WINDOW), b_s, float("-inf"))
        if LAST:
            b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A row whose keys are all masked keeps m = -inf; exponentiate against 0 instead so it stays 0, not NaN.
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp2(b_s - b_m_safe[:, None])  # [BM, BN]
        b_alpha = tl.exp2(b_m - b_m_safe)  # [BM]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if HAS_DROPOUT:
            b_keep = _dropout_keep(seed, offset, i_h, o_tok, start_n, dropout_p, BN)
            b_p = tl.where(b_keep, b_p * inv_keep, 0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        return b_m_new, b_l, b_acc


    @triton.jit(do_not_specialize=["T", "NM"])
    def _attn_fwd_kernel(
        q, k, v, o, lse, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        T, NM, scale_log2, dropout_p, inv_keep, softcap_scale, softcap_log2,
        HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        # One program: BM query rows of one (sequence, query head); grid = NM * B * HQ, query block fastest so that
        # programs running together share the K/V of one head in L2. Offsets within a sequence are int32 off int64
        # base pointers (the host checks they fit).
        pid = tl.program_id(0)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_kh = i_h // GROUP
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b)
        if i_m * BM >= L:
            return

        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        m_m = o_m < L
        m_d = o_d < D
        p_q = q + bos * stride_qt + i_h * stride_qh + (o_m[:, None] * stride_qt + o_d[None, :])
        b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        p_k = k + bos * stride_kt + i_kh * stride_kh + (o_n[None, :] * stride_kt + o_d[:, None])  # [BD, BN]
        p_v = v + bos * stride_vt + i_kh * stride_vh + (o_n[:, None] * stride_vt + o_d[None, :])  # [BN, BD]
        seed, offset = 0, 0
        o_tok = o_m  # [BM]: packed row index of each query, the dropout counter
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            o_tok = (bos + o_m).to(tl.int32)

        b_m = tl.full([BM], float("-inf"), tl.float32)
        b_l = tl.zeros([BM], tl.float32)
        b_acc = tl.zeros([BM, BD], tl.float32)
        # Keys [n_lo, n_hi): the whole sequence, or the band causality / the window leaves these rows. Only the
        # block at n_full can reach past n_hi (past L, or out of the band: _in_band masks that).
        n_lo, n_hi = _band_keys(i_m * BM, BM, L, CAUSAL, WINDOW, BN)
        n_full = (n_hi // BN) * BN
        for start_n in range(n_lo, n_full, BN):
            b_m, b_l, b_acc = _fwd_step(b_q, b_m, b_l, b_acc, p_k, p_v, start_n, L, o_m, o_n, m_d, stride_kt,
                                        stride_vt, seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep,
                                        softcap_scale, softcap_log2, BN, HAS_DROPOUT, PRECISION, False,
                                        CAUSAL, WINDOW, SOFTCAP)
        if n_full < n_hi:
            b_m, b_l, b_acc = _fwd_step(b_q, b_m, b_l, b_acc, p_k, p_v, n_full, L, o_m, o_n, m_d, stride_kt,
                                        stride_vt, seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep,
                                        softcap_scale, softcap_log2, BN, HAS_DROPOUT, PRECISION, True,
                                        CAUSAL, WINDOW, SOFTCAP)

        b_m = tl.where(b_m == float("-inf"), 0.0, b_m)
        b_l = tl.where(b_l == 0.0, 1.0, b_l)
        b_o = b_acc / b_l[:, None]  # [BM, BD]
        p_o = o + bos * stride_ot + i_h * stride_oh + (o_m[:, None] * stride_ot + o_d[None, :])
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
        # Log-sum-exp in base 2 of the scaled logits: p = exp2(s * scale_log2 - lse) in the backward.
        tl.store(lse + i_h.to(tl.int64) * T + bos + o_m, b_m + tl.log2(b_l), mask=m_m)


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


    @triton.jit
    def _dkdv_step(b_k, b_v, b_dk, b_dv, p_q, p_do, p_lse, p_delta, start_m, L, o_m, o_n, m_d, stride_qt,
                   stride_dot, seed, offset, i_h, tok0, col_start, scale_log2, dropout_p, inv_keep, softcap_scale,
                   softcap_log2, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                   LAST: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        # One query block against this program's keys; only the LAST query block can run past the sequence end.
        if LAST:
            m_m = (start_m + o_m) < L
            m_md = m_m[:, None] & m_d[None, :]
            b_q = tl.load(p_q + start_m * stride_qt, mask=m_md, other=0.0)  # [BM, BD]
            b_do = tl.load(p_do + start_m * stride_dot, mask=m_md, other=0.0)  # [BM, BD]
            b_lse = tl.load(p_lse + start_m, mask=m_m, other=0.0)  # [BM]
            b_delta = tl.load(p_delta + start_m, mask=m_m, other=0.0)  # [BM]
        else:
            b_q = tl.load(p_q + start_m * stride_qt, mask=m_d[None, :], other=0.0)  # [BM, BD]
            b_do = tl.load(p_do + start_m * stride_dot, mask=m_d[None, :], other=0.0)  # [BM, BD]
            b_lse = tl.load(p_lse + start_m)  # [BM]
            b_delta = tl.load(p_delta + start_m)  # [BM]
        if SOFTCAP:
            # With a cap, dP comes first and dS is formed before the dV matmul, so the tanh tile is never live
            # across a matmul (in the order below it spilled at head dim 128 with dropout).
            b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
        b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION)  # [BN, BM]
        if SOFTCAP:
            b_tT = _tanh(b_sT * softcap_scale)  # [BN, BM]
            b_pT = tl.exp2(b_tT * softcap_log2 - b_lse[None, :])  # [BN, BM]
        else:
            b_pT = tl.exp2(b_sT * scale_log2 - b_lse[None, :])  # [BN, BM]
        if CAUSAL or WINDOW > 0:
            b_pT = tl.where(_in_band((start_m + o_m)[None, :], o_n[:, None], CAUSAL, WINDOW), b_pT, 0.0)
        if LAST:
            # Padding query rows (beyond L) must contribute nothing; their lse was never written.
            b_pT = tl.where(m_m[None, :], b_pT, 0.0)
        if not SOFTCAP:
            b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BN, BM]
        if HAS_DROPOUT:
            b_keep = _dropout_keep_t(seed, offset, i_h, tok0 + start_m + o_m, col_start, dropout_p, BN)
            b_pdT = tl.where(b_keep, b_pT * inv_keep, 0.0)
            b_dpT = tl.where(b_keep, b_dpT * inv_keep, 0.0)
        else:
            b_pdT = b_pT
        if SOFTCAP:
            b_dsT = b_pT * (b_dpT - b_delta[None, :]) * (1.0 - b_tT * b_tT)  # [BN, BM], through c * tanh(s / c)
            b_dv += tl.dot(b_pdT.to(b_do.dtype), b_do, input_precision=PRECISION)
        else:
            b_dv += tl.dot(b_pdT.to(b_do.dtype), b_do, input_precision=PRECISION)
            b_dsT = b_pT * (b_dpT - b_delta[None, :])  # [BN, BM]
        b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=PRECISION)
        return b_dk, b_dv


    @triton.jit(do_not_specialize=["T", "NN"])
    def _attn_bwd_dkdv_kernel(
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dks, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        T, NN, scale, scale_log2, dropout_p, inv_keep, softcap_scale, softcap_log2,
        HKV: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        # One program: BN keys of one (sequence, KV head) and GROUP / SPLIT of the query heads sharing that KV
        # head, over all query blocks; the GQA sum over its heads happens in registers. SPLIT == 1: every dK/dV
        # element has one writer. SPLIT > 1 (long sequences, too few programs to fill the GPU): each split writes
        # fp32 partials to its own slice (stride_dks) of dk/dv and the host sums them: no atomics either way.
        pid = tl.program_id(0)
        i_n = pid % NN
        i_s = (pid // NN) % SPLIT
        i_bh = pid // NN // SPLIT
        i_b = i_bh // HKV
        i_kh = i_bh % HKV
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b)
        if i_n * BN >= L:
            return

        o_n = i_n * BN + tl.arange(0, BN)
        o_m = tl.arange(0, BM)
        o_d = tl.arange(0, BD)
        m_n = o_n < L
        m_d = o_d < D
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(k + bos * stride_kt + i_kh * stride_kh + (o_n[:, None] * stride_kt + o_d[None, :]),
                      mask=m_nd, other=0.0)  # [BN, BD]
        b_v = tl.load(v + bos * stride_vt + i_kh * stride_vh + (o_n[:, None] * stride_vt + o_d[None, :]),
                      mask=m_nd, other=0.0)  # [BN, BD]
        seed, offset, tok0 = 0, 0, 0
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            tok0 = bos.to(tl.int32)

        b_dk = tl.zeros([BN, BD], tl.float32)
        b_dv = tl.zeros([BN, BD], tl.float32)
        # Query rows [m_lo, m_hi) see these keys (all of the sequence without causality or a window); only the
        # block at m_full can reach past m_hi.
        m_lo, m_hi = _band_queries(i_n * BN, BN, L, CAUSAL, WINDOW, BM)
        m_full = (m_hi // BM) * BM
        for g in range(GROUP // SPLIT):
            i_h = i_kh * GROUP + i_s * (GROUP // SPLIT) + g
            p_q = q + bos * stride_qt + i_h * stride_qh + (o_m[:, None] * stride_qt + o_d[None, :])
            p_do = do + bos * stride_dot + i_h * stride_doh + (o_m[:, None] * stride_dot + o_d[None, :])
            p_lse = lse + i_h.to(tl.int64) * T + bos + o_m
            p_delta = delta + i_h.to(tl.int64) * T + bos + o_m
            for start_m in range(m_lo, m_full, BM):
                b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_q, p_do, p_lse, p_delta, start_m, L, o_m, o_n,
                                        m_d, stride_qt, stride_dot, seed, offset, i_h, tok0, i_n * BN, scale_log2,
                                        dropout_p, inv_keep, softcap_scale, softcap_log2, BN, HAS_DROPOUT,
                                        PRECISION, False, CAUSAL, WINDOW, SOFTCAP)
            if m_full < m_hi:
                b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_q, p_do, p_lse, p_delta, m_full, L, o_m, o_n,
                                        m_d, stride_qt, stride_dot, seed, offset, i_h, tok0, i_n * BN, scale_log2,
                                        dropout_p, inv_keep, softcap_scale, softcap_log2, BN, HAS_DROPOUT,
                                        PRECISION, True, CAUSAL, WINDOW, SOFTCAP)

        b_dk = b_dk * scale
        dk += i_s.to(tl.int64) * stride_dks
        dv += i_s.to(tl.int64) * stride_dks
        tl.store(dk + bos * stride_dkt + i_kh * stride_dkh + (o_n[:, None] * stride_dkt + o_d[None, :]),
                 b_dk.to(dk.dtype.element_ty), mask=m_nd)
        tl.store(dv + bos * stride_dvt + i_kh * stride_dvh + (o_n[:, None] * stride_dvt + o_d[None, :]),
                 b_dv.to(dv.dtype.element_ty), mask=m_nd)


    @triton.jit
    def _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_kT, p_vT, start_n, L, o_m, o_n, m_d, stride_kt, stride_vt,
                 seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep, softcap_scale, softcap_log2,
                 BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr, LAST: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        if LAST:
            m_n = (start_n + o_n) < L
            m_dn = m_d[:, None] & m_n[None, :]
            b_kT = tl.load(p_kT + start_n * stride_kt, mask=m_dn, other=0.0)  # [BD, BN]
            b_vT = tl.load(p_vT + start_n * stride_vt, mask=m_dn, other=0.0)  # [BD, BN]
        else:
            b_kT = tl.load(p_kT + start_n * stride_kt, mask=m_d[:, None], other=0.0)  # [BD, BN]
            b_vT = tl.load(p_vT + start_n * stride_vt, mask=m_d[:, None], other=0.0)  # [BD, BN]
        if SOFTCAP:
            # dP first, so that the tanh tile is never live across a matmul (as in _dkdv_step).
            b_dp = tl.dot(b_do, b_vT, input_precision=PRECISION)  # [BM, BN]
        b_s = tl.dot(b_q, b_kT, input_precision=PRECISION)  # [BM, BN]
        if SOFTCAP:
            b_t = _tanh(b_s * softcap_scale)  # [BM, BN]
            b_p = tl.exp2(b_t * softcap_log2 - b_lse[:, None])  # [BM, BN]
        else:
            b_p = tl.exp2(b_s * scale_log2 - b_lse[:, None])  # [BM, BN]
        if CAUSAL or WINDOW > 0:
            b_p = tl.where(_in_band(o_m[:, None], (start_n + o_n)[None, :], CAUSAL, WINDOW), b_p, 0.0)
        if LAST:
            b_p = tl.where(m_n[None, :], b_p, 0.0)
        if not SOFTCAP:
            b_dp = tl.dot(b_do, b_vT, input_precision=PRECISION)  # [BM, BN]
        if HAS_DROPOUT:
            b_keep = _dropout_keep(seed, offset, i_h, o_tok, start_n, dropout_p, BN)
            b_dp = tl.where(b_keep, b_dp * inv_keep, 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])  # [BM, BN]
        if SOFTCAP:
            b_ds = b_ds * (1.0 - b_t * b_t)  # through c * tanh(s / c)
        b_dq += tl.dot(b_ds.to(b_kT.dtype), tl.trans(b_kT), input_precision=PRECISION)
        return b_dq


    @triton.jit(do_not_specialize=["T", "NM"])
    def _attn_bwd_dq_kernel(
        q, k, v, do, lse, delta, dq, cu_seqlens, rng,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
        T, NM, scale, scale_log2, dropout_p, inv_keep, softcap_scale, softcap_log2,
        HQ: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_kh = i_h // GROUP
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b)
        if i_m * BM >= L:
            return

        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_d = tl.arange(0, BD)
        m_m = o_m < L
        m_d = o_d < D
        m_md = m_m[:, None] & m_d[None, :]
        b_q = tl.load(q + bos * stride_qt + i_h * stride_qh + (o_m[:, None] * stride_qt + o_d[None, :]),
                      mask=m_md, other=0.0)  # [BM, BD]
        b_do = tl.load(do + bos * stride_dot + i_h * stride_doh + (o_m[:, None] * stride_dot + o_d[None, :]),
                       mask=m_md, other=0.0)  # [BM, BD]
        b_lse = tl.load(lse + i_h.to(tl.int64) * T + bos + o_m, mask=m_m, other=0.0)  # [BM]
        b_delta = tl.load(delta + i_h.to(tl.int64) * T + bos + o_m, mask=m_m, other=0.0)  # [BM]
        p_kT = k + bos * stride_kt + i_kh * stride_kh + (o_n[None, :] * stride_kt + o_d[:, None])  # [BD, BN]
        p_vT = v + bos * stride_vt + i_kh * stride_vh + (o_n[None, :] * stride_vt + o_d[:, None])  # [BD, BN]
        seed, offset = 0, 0
        o_tok = o_m
        if HAS_DROPOUT:
            seed = tl.load(rng)
            offset = tl.load(rng + 1).to(tl.int32)
            o_tok = (bos + o_m).to(tl.int32)

        b_dq = tl.zeros([BM, BD], tl.float32)
        n_lo, n_hi = _band_keys(i_m * BM, BM, L, CAUSAL, WINDOW, BN)  # as in the forward
        n_full = (n_hi // BN) * BN
        for start_n in range(n_lo, n_full, BN):
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_kT, p_vT, start_n, L, o_m, o_n, m_d, stride_kt,
                            stride_vt, seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep, softcap_scale,
                            softcap_log2, BN, HAS_DROPOUT, PRECISION, False, CAUSAL, WINDOW, SOFTCAP)
        if n_full < n_hi:
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_kT, p_vT, n_full, L, o_m, o_n, m_d, stride_kt,
                            stride_vt, seed, offset, i_h, o_tok, scale_log2, dropout_p, inv_keep, softcap_scale,
                            softcap_log2, BN, HAS_DROPOUT, PRECISION, True, CAUSAL, WINDOW, SOFTCAP)

        b_dq = b_dq * scale
        tl.store(dq + bos * stride_dqt + i_h * stride_dqh + (o_m[:, None] * stride_dqt + o_d[None, :]),
                 b_dq.to(dq.dtype.element_ty), mask=m_md)


    @triton.jit(do_not_specialize=["NM"])
    def _dropout_mask_kernel(
        mask, cu_seqlens, rng, stride_mb, stride_mh, stride_mm, NM, dropout_p,
        HQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        i_m = pid % NM
        i_bh = pid // NM
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        L = tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b)
        if i_m * BM >= L:
            return
        seed = tl.load(rng)
        offset = tl.load(rng + 1).to(tl.int32)
        o_m = i_m * BM + tl.arange(0, BM)
        o_n = tl.arange(0, BN)
        o_tok = (bos + o_m).to(tl.int32)  # [BM]
        p_mask = (mask + i_b.to(tl.int64) * stride_mb + i_h.to(tl.int64) * stride_mh
                  + o_m[:, None].to(tl.int64) * stride_mm)
        for start_n in range(0, L, BN):
            b_keep = _dropout_keep(seed, offset, i_h, o_tok, start_n, dropout_p, BN)
            m_mn = (o_m < L)[:, None] & ((start_n + o_n) < L)[None, :]
            tl.store(p_mask + (start_n + o_n)[None, :], b_keep.to(tl.int8), mask=m_mn)


# --------------------------------------------------------------------------------------------------------------
# Launch configuration: every block size, warp count and pipeline depth is chosen here.
# --------------------------------------------------------------------------------------------------------------

# Benchmarks may set this to a dict with any of the keys below to try other tilings; None = the defaults.
CONFIG_OVERRIDE = None


def device_arch(device):
    """The CUDA compute capability of ``device`` as an int (90 = Hopper, 80 = Ampere); None for CPU tensors and
    the interpreter, which get their own tiling."""
    if device.type != "cuda" or _interpreting():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _tile(bm, bn, warps, stages):
    return bm, bn, warps, stages


# (arch, padded head dim, 16-bit, dropout) -> forward, dK/dV, dQ tiles as (BM, BN, warps, stages), chosen from
# the compile sweep (python -m llm2vec_fast.kernels.gpu_compile --sweep; its output for these keys is
# benchmarks/results/compile_sweep_bf16_d64_d128.txt): among the candidates that neither spill registers nor
# exceed the target's shared memory, the largest tile that stays clear of the 255-register ceiling (a tile at
# 255 with no spill today spills after a small kernel change), then the deeper pipeline. One table serves every
# Triton the project supports: a tile must compile without spilling under the oldest (3.6) and the newest, whose
# register allocation differs (3.6 spilled 32x128 dK/dV at head dim 128 on sm_90, which 3.9 did not; the compile
# tests run under both). Head dims 129-256 keep the earlier tiles (not swept; they spill), fp32 has its own
# narrower ones.
_TILINGS = {
    # Hopper, 16-bit. Every entry compiles with no spill.
    (90, 64, False, False): (_tile(128, 128, 8, 2), _tile(32, 128, 8, 2), _tile(128, 64, 8, 2)),
    (90, 64, False, True): (_tile(128, 64, 8, 3), _tile(32, 128, 8, 2), _tile(128, 64, 8, 2)),
    (90, 128, False, False): (_tile(128, 64, 8, 3), _tile(16, 128, 8, 2), _tile(128, 64, 8, 2)),
    # With dropout every two-stage dK/dV candidate spills under Triton 3.6; one stage of 16x64 does not.
    (90, 128, False, True): (_tile(128, 64, 8, 3), _tile(16, 64, 8, 1), _tile(128, 64, 8, 2)),
    # Ampere, 16-bit: mma.sync keeps more in registers than wgmma, so narrower tiles; at head dim 128 only 16-row
    # dQ programs stay clear of spills.
    (80, 64, False, False): (_tile(128, 64, 8, 3), _tile(32, 128, 8, 2), _tile(128, 32, 8, 3)),
    (80, 64, False, True): (_tile(128, 64, 8, 3), _tile(16, 128, 8, 2), _tile(128, 32, 8, 3)),
    (80, 128, False, False): (_tile(128, 32, 8, 3), _tile(16, 128, 8, 2), _tile(16, 32, 4, 2)),
    (80, 128, False, True): (_tile(128, 32, 8, 3), _tile(16, 64, 4, 2), _tile(16, 32, 4, 2)),
}
_TILING_256 = (_tile(64, 32, 8, 2), _tile(32, 64, 8, 1), _tile(64, 32, 8, 1))
# Tiles that replace the above when causality or a window masks the band (16-bit), keyed by (target, padded head
# dim, dropout): {kernel: tile}. The band's compares (and the tanh of a cap) spilled these tiles above:
# - dK/dV with dropout, head dim 128: every 64-key tile spilled (sm_90: 48-152 B of stack per thread, sm_80:
#   32-112 B, Triton 3.6 and 3.9); 16x32 with 4 warps does not (186-233 registers), on mma.sync. Its split variant
#   (dkdv_split) spilled 96-144 B, so these calls never split (may_split_dkdv).
# - dK/dV with dropout, head dim 64 on sm_90: 32x128 spilled 24 B under 3.6; 16x128 does not.
# - dQ on sm_90 at head dim 128: 128x64 spilled 8 B under 3.9; 128x32 stays at 186-197 registers.
_BAND_TILES = {
    (90, 128, True): {"dkdv": _tile(16, 32, 4, 2), "dq": _tile(128, 32, 8, 2)},
    (80, 128, True): {"dkdv": _tile(16, 32, 4, 2)},
    (90, 64, True): {"dkdv": _tile(16, 128, 8, 2)},
    (90, 128, False): {"dq": _tile(128, 32, 8, 2)},
}


# fp32 operands take twice the registers and shared memory of 16-bit ones: narrower tiles on every target.
_FP32_TILING = {
    64: (_tile(64, 32, 4, 2), _tile(16, 64, 4, 2), _tile(64, 32, 4, 2)),
    128: (_tile(64, 32, 4, 2), _tile(16, 64, 4, 2), _tile(64, 32, 4, 2)),
    256: (_tile(32, 32, 4, 1), _tile(16, 32, 4, 1), _tile(32, 32, 4, 1)),
}


def _tiling(arch, bd, dtype, dropout, band=False):
    arch = arch if arch in (80, 90) else (90 if arch > 90 else 80)
    if dtype == torch.float32:
        tiles = _FP32_TILING[max(64, bd)]
    else:
        tiles = _TILING_256 if bd > 128 else _TILINGS[(arch, max(64, bd), False, bool(dropout))]
        if band and bd <= 128:
            override = _BAND_TILES.get((arch, max(64, bd), bool(dropout)), {})
            tiles = (tiles[0], override.get("dkdv", tiles[1]), override.get("dq", tiles[2]))
    out = {}
    for prefix, (bm, bn, warps, stages) in zip(("fwd", "dkdv", "dq"), tiles):
        out.update({f"{prefix}_bm": bm, f"{prefix}_bn": bn, f"{prefix}_warps": warps, f"{prefix}_stages": stages})
    return out


def attention_config(head_dim, dtype=torch.bfloat16, dropout=False, arch=90, band=False):
    """Tiling for one kind of input: forward (fwd_bm query rows x fwd_bn keys per step), dK/dV (dkdv_bm query
    rows per step x dkdv_bn keys per program), dQ (dq_bm rows per program x dq_bn keys per step), and each
    kernel's warps and pipeline stages. ``band``: causality or a window masks the scores. ``arch=None`` is the
    interpreter's tiling."""
    bd = max(16, triton.next_power_of_2(head_dim))
    if arch is None:
        # The interpreter costs ~5 ms per (program x loop step) whatever the block: few, mid-sized blocks.
        cfg = dict(fwd_bm=32, fwd_bn=32, fwd_warps=4, fwd_stages=1, dkdv_bm=32, dkdv_bn=32, dkdv_warps=4,
                   dkdv_stages=1, dq_bm=32, dq_bn=32, dq_warps=4, dq_stages=1)
    else:
        cfg = dict(_tiling(arch, bd, dtype, dropout, band))
    if CONFIG_OVERRIDE:
        cfg.update(CONFIG_OVERRIDE)
    cfg["bd"] = bd
    return cfg


# fp32 inputs run on TF32 tensor cores by default ("tf32": 10-bit mantissas in the products, fp32 accumulation,
# ~1e-3 relative error, as torch gives fp32 matmuls under torch.set_float32_matmul_precision("high")). The opt-outs
# cost registers: "tf32x3" (each operand split into a TF32 high part and residual, three products: close to fp32)
# and "ieee" (exact fp32 FMA, no tensor cores) both spill at every tiling compiled (kernels/README.md). The
# setting LLM2VEC_FAST_ATTENTION_FP32 (llm2vec_fast/settings.py) chooses.
def fp32_precision() -> str:
    """"tf32", "tf32x3" or "ieee": how fp32 inputs are multiplied (LLM2VEC_FAST_ATTENTION_FP32)."""
    return settings.current().attention_fp32


def _precision(dtype):
    if dtype != torch.float32:
        return "tf32"  # fp16/bf16 operands go to the tensor cores as they are; the setting is ignored
    return fp32_precision()


class Launch:
    """One kernel launch as the host functions make it: the kernel, its constexprs, warps and stages, and (for
    ``gpu_compile``, which compiles it without a GPU) the dtypes of its pointer arguments and its fp32 scalars."""

    def __init__(self, kernel, constexprs, num_warps, num_stages, pointers, floats):
        self.kernel, self.constexprs = kernel, constexprs
        self.num_warps, self.num_stages = num_warps, num_stages
        self.pointers, self.floats = pointers, floats

    def options(self):
        return dict(self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def attention_launches(dtype, head_dim, num_q_heads, num_kv_heads, dropout, arch, dkdv_split=1, *,
                       causal=False, window=0, softcap=False):
    """Every Triton launch ``attention_forward`` and ``attention_backward`` make for inputs of this kind, by name:
    forward, bwd_preprocess, bwd_dkdv, bwd_dq. The host functions launch exactly these; the compile tests compile
    exactly these. ``window`` is the sliding window (0: none), ``softcap`` whether the logits are soft-capped (the
    cap itself is a runtime scalar)."""
    cfg = attention_config(head_dim, dtype, dropout, arch, band=bool(causal or window))
    D, BD, group = head_dim, cfg["bd"], num_q_heads // num_kv_heads
    scalars = ("scale", "scale_log2", "dropout_p", "inv_keep", "softcap_scale", "softcap_log2")
    io = dict.fromkeys(("q", "k", "v", "o", "do", "dq", "dk", "dv"), dtype)
    aux = dict(lse=torch.float32, delta=torch.float32, cu_seqlens=torch.int32, rng=torch.int64)
    common = dict(D=D, BD=BD, HAS_DROPOUT=bool(dropout), PRECISION=_precision(dtype), CAUSAL=bool(causal),
                  WINDOW=int(window), SOFTCAP=bool(softcap))
    return {
        "forward": Launch(_attn_fwd_kernel, dict(common, HQ=num_q_heads, GROUP=group, BM=cfg["fwd_bm"],
                                                 BN=cfg["fwd_bn"]),
                          cfg["fwd_warps"], cfg["fwd_stages"], dict(io, **aux), scalars),
        "bwd_preprocess": Launch(_attn_bwd_preprocess_kernel, dict(D=D, BD=BD, BT=64 if BD <= 128 else 32), 4, 1,
                                 dict(io, **aux), ()),
        # A split dK/dV writes fp32 partials (attention_backward sums them).
        "bwd_dkdv": Launch(_attn_bwd_dkdv_kernel, dict(common, HKV=num_kv_heads, GROUP=group, SPLIT=dkdv_split,
                                                       BM=cfg["dkdv_bm"], BN=cfg["dkdv_bn"]),
                           cfg["dkdv_warps"], cfg["dkdv_stages"],
                           dict(io, **aux, **(dict(dk=torch.float32, dv=torch.float32) if dkdv_split > 1 else {})),
                           scalars),
        "bwd_dq": Launch(_attn_bwd_dq_kernel, dict(common, HQ=num_q_heads, GROUP=group, BM=cfg["dq_bm"],
                                                   BN=cfg["dq_bn"]),
                         cfg["dq_warps"], cfg["dq_stages"], dict(io, **aux), scalars),
    }


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
    # torch.amp.is_autocast_available does not trace under torch.compile on torch 2.11; is_autocast_enabled does,
    # and raises only for the meta device, which has no autocast.
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))


# Blocks run up to one tile past a sequence's end (masked); the largest tile is 128 rows.
_OFFSET_SLACK = 256


def _check_int32_offsets(max_seqlen, *tensors):
    """The kernels index within a sequence with int32 offsets off an int64 base (cheaper address arithmetic in
    the inner loops), so one sequence's rows must span fewer than 2^31 elements of each tensor."""
    row = max(max(x.stride(0) for x in tensors), max(x.shape[1] * x.shape[2] for x in tensors))
    if (int(max_seqlen) + _OFFSET_SLACK) * row >= 2**31:
        raise ValueError(f"a sequence of {max_seqlen} tokens spans more than 2^31 elements of a tensor with row "
                         f"stride {row}; the kernels index within a sequence in int32: split sequences longer "
                         f"than {2**31 // row - _OFFSET_SLACK} tokens")


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


def may_split_dkdv(dropout, band):
    """Whether the dK/dV kernel may split a GQA group (``dkdv_split``): not with dropout and a band mask, whose split
    variant spilled registers (see _BAND_TILES)."""
    return not (dropout and band)


def dkdv_split(programs, group, device):
    """How many programs share the query heads of one GQA group in the dK/dV kernel. 1 (one program sums the
    whole group in registers) unless its programs (key blocks x sequences x KV heads) leave SMs idle, as one long
    sequence with few KV heads does (sm_90 and newer); then the smallest divisor of the group that gives every SM a
    program.
    ``CONFIG_OVERRIDE["dkdv_split"]`` forces a value (tests, sweeps)."""
    if CONFIG_OVERRIDE and "dkdv_split" in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE["dkdv_split"]
    arch = device_arch(device)
    # On Ampere the split variant spills registers at head dim 128 with dropout (1 KB per thread, measured by
    # gpu_compile), where the unsplit one does not: splits are for Hopper and newer.
    if group == 1 or arch is None or arch < 90:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for split in range(1, group + 1):
        if group % split == 0 and programs * split >= sms:
            return split
    return group


def _softcap_scalars(softmax_scale, softcap):
    """(softcap_scale, softcap_log2) = (scale / c, c * log2(e)): the kernels form c * tanh(scale * qk / c) in base 2
    from them. Zeros (unread) without a cap."""
    if softcap is None:
        return 0.0, 0.0
    return softmax_scale / softcap, softcap * LOG2E


def attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p=0.0, rng=None, *, causal=False,
                      window=None, softcap=None):
    """Triton forward. Returns ``out [T, Hq, D]`` and the base-2 log-sum-exp ``lse [Hq, T]`` (fp32) of the
    (soft-capped) logits. ``causal``, ``window``, ``softcap`` as in ``varlen_attention`` (already validated)."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    has_dropout = dropout_p > 0.0
    masks = dict(causal=causal, window=window or 0, softcap=softcap is not None)
    fwd = attention_launches(q.dtype, D, HQ, HKV, has_dropout, device_arch(q.device), **masks)["forward"]
    o = _alloc((T, HQ, D), q.dtype, q.device)
    lse = _alloc((HQ, T), torch.float32, q.device)
    NM = triton.cdiv(max(max_seqlen, 1), fwd.constexprs["BM"])
    grid = (NM * B * HQ,)
    if grid[0] == 0 or T == 0:
        return o, lse
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens, rng if has_dropout else cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        T, NM, softmax_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p), *_softcap_scalars(softmax_scale, softcap),
        **fwd.options(),
    )
    return o, lse


def attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p=0.0, rng=None, *,
                       causal=False, window=None, softcap=None):
    """Triton backward: delta = rowsum(dO * O), then dK/dV (GQA summed in-kernel) and dQ. No atomics."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    B = cu_seqlens.numel() - 1
    has_dropout = dropout_p > 0.0
    masks = dict(causal=causal, window=window or 0, softcap=softcap is not None)
    launches = attention_launches(q.dtype, D, HQ, HKV, has_dropout, device_arch(q.device), **masks)
    do = _lastdim_contiguous(do)
    if (max_seqlen + _OFFSET_SLACK) * do.stride(0) >= 2**31:
        do = do.contiguous()  # a broadcast or strided gradient; contiguous rows are as narrow as q's
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if T == 0 or B == 0:
        return dq, dk, dv
    delta = _alloc((HQ, T), torch.float32, q.device)
    pre = launches["bwd_preprocess"]
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, pre.constexprs["BT"]), HQ)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T, **pre.options(),
    )
    rng = rng if has_dropout else cu_seqlens
    scalars = (softmax_scale, softmax_scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
               *_softcap_scalars(softmax_scale, softcap))
    NN = triton.cdiv(max(max_seqlen, 1), launches["bwd_dkdv"].constexprs["BN"])
    split = dkdv_split(NN * B * HKV, HQ // HKV, q.device) if may_split_dkdv(has_dropout, causal or window) else 1
    dkdv = attention_launches(q.dtype, D, HQ, HKV, has_dropout, device_arch(q.device), split, **masks)["bwd_dkdv"]
    # split > 1: fp32 partial sums per split of the query heads, summed here.
    dk_out = dk if split == 1 else _alloc((split, *k.shape), torch.float32, k.device)
    dv_out = dv if split == 1 else _alloc((split, *v.shape), torch.float32, v.device)
    _attn_bwd_dkdv_kernel[(NN * split * B * HKV,)](
        q, k, v, do, lse, delta, dk_out, dv_out, cu_seqlens, rng,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        0 if split == 1 else dk_out.stride(0), dk_out.stride(-3), dk_out.stride(-2), dv_out.stride(-3),
        dv_out.stride(-2), T, NN, *scalars, **dkdv.options(),
    )
    if split > 1:
        dk, dv = dk_out.sum(0).to(k.dtype), dv_out.sum(0).to(v.dtype)
    dqk = launches["bwd_dq"]
    NM = triton.cdiv(max(max_seqlen, 1), dqk.constexprs["BM"])
    _attn_bwd_dq_kernel[(NM * B * HQ,)](
        q, k, v, do, lse, delta, dq, cu_seqlens, rng,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        T, NM, *scalars, **dqk.options(),
    )
    return dq, dk, dv


# The Triton path as torch.library custom ops, so torch.compile traces through them (fake implementations give
# the output shapes without running anything) and autograd runs the Triton backward. Autocast is applied by
# varlen_attention before the op, as SDPA applies it (see _autocast_inputs), so the ops see one dtype.


@torch.library.custom_op("llm2vec_fast_triton::varlen_attention_forward", mutates_args=())
def varlen_attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, softmax_scale: float, dropout_p: float,
                                rng: Optional[torch.Tensor], causal: bool = False, window: Optional[int] = None,
                                softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward as a custom op: ``(out [T, Hq, D], lse [Hq, T] fp32)``."""
    return attention_forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng, causal=causal,
                             window=window, softcap=softcap)


@varlen_attention_forward_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng, causal=False, window=None, softcap=None):
    T, HQ, D = q.shape
    return q.new_empty((T, HQ, D)), q.new_empty((HQ, T), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast_triton::varlen_attention_backward", mutates_args=())
def varlen_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                 softmax_scale: float, dropout_p: float, rng: Optional[torch.Tensor],
                                 causal: bool = False, window: Optional[int] = None,
                                 softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward as a custom op: ``(dq, dk, dv)``; the dropout masks are regenerated from ``rng``."""
    return attention_backward(do, q, k, v, o, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng,
                              causal=causal, window=window, softcap=softcap)


@varlen_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng, causal=False, window=None,
      softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, rng, causal, window, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, rng)
    ctx.max_seqlen, ctx.softmax_scale, ctx.dropout_p = max_seqlen, softmax_scale, dropout_p
    ctx.causal, ctx.window, ctx.softcap = causal, window, softcap


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens, rng = ctx.saved_tensors
    dq, dk, dv = varlen_attention_backward_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.softmax_scale,
                                              ctx.dropout_p, rng, ctx.causal, ctx.window, ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None, None, None


varlen_attention_forward_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


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


def _band_mask(S, causal, window, device):
    """Bool ``[S, S]`` (query, key) "may attend" of positions within one sequence: key j <= query i when causal,
    |i - j| < window when a window is set; None when neither restricts anything."""
    if not causal and window is None:
        return None
    pos = torch.arange(S, device=device)
    dist = pos[:, None] - pos[None, :]  # [S, S] query minus key position
    keep = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
    if window is not None:
        keep = keep & (dist.abs() < window)
    return keep


def _masked_attention(q, k, v, mask, dropout_p, softmax_scale, softcap):
    """The math path for band-masked or soft-capped logits: q [G, Hq, S, D], k, v [G, Hkv, S, D], mask bool
    broadcastable to [G, Hq, S, S] or None. SDPA cannot cap logits, and with a band mask its CPU kernel's fp32
    gradients came out up to 4x further from float64 than this plain math (tests/kernels/test_attention_masks.py),
    so both take this path; it holds the [G, Hq, S, S] scores, which at CPU batch sizes is small. In fp32 at least
    (16-bit inputs are computed in fp32, as SDPA's CPU kernels do); differentiable; dropout on the probabilities
    from torch's generator."""
    group = q.shape[1] // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    k, v = k.repeat_interleave(group, 1).to(dtype), v.repeat_interleave(group, 1).to(dtype)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * softmax_scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return (p @ v).to(q.dtype)


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, dropout_p, causal=False, window=None,
                            softcap=None):
    """CPU path: sequences of similar length are re-padded together into [G, H, S, D] and run through one SDPA
    call with a key-padding mask (none when a group's lengths are equal); the outputs are scattered back.
    Grouping bounds the padding, which a single re-pad to max_seqlen would make quadratic in the longest text
    (benchmarks/bench_kernels.py, bench_encode.py). Differentiable; dropout from torch's CPU generator.
    Causality and a sliding window join the mask, and like soft-capped logits take the explicit math path
    (``_masked_attention``)."""
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

        # A window as long as the group's longest sequence restricts nothing.
        mask = _band_mask(S, causal, window if window is not None and window < S else None, q.device)  # [S, S]
        if slots.numel() != G * S:
            valid = torch.arange(S, device=q.device)[None, :] < group_lengths[:, None]  # [G, S]
            if mask is None:
                mask = valid[:, None, None, :]
            else:
                # Padding query rows keep their band (their own slot at least): a row with every key masked gives
                # NaN probabilities, and their gradient would reach the keys through it.
                mask = (mask[None] & (valid[:, None, :] | ~valid[:, :, None]))[:, None]  # [G, 1, S, S]
        if softcap is None and not causal and window is None:
            out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, dropout_p=dropout_p,
                                                 scale=softmax_scale, enable_gqa=HQ != k.shape[1])  # [G, HQ, S, D]
        else:
            out = _masked_attention(pad(q), pad(k), pad(v), mask, dropout_p, softmax_scale, softcap)
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


def _check_mask_options(causal, window, softcap):
    """(causal, window, softcap) as the kernels take them, or a ValueError that says what is accepted."""
    if causal not in (True, False):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1):
        raise ValueError(f"window must be a positive int (query i sees keys j with |i - j| < window) or None for "
                         f"no window, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, numbers.Real)
                                or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"softcap must be a positive finite float (logits become softcap * tanh(logits / softcap)) "
                         f"or None for no cap, got {softcap!r}")
    return bool(causal), None if window is None else int(window), None if softcap is None else float(softcap)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0, *, causal=False,
                     window=None, softcap=None, deterministic=True, force_triton=False):
    """Attention within each packed sequence: bidirectional by default, causal, sliding-window, soft-capped.

    q: [T, Hq, D]; k, v: [T, Hkv, D] (Hq a multiple of Hkv, D <= 256), fp16/bf16/fp32, last dim contiguous.
    cu_seqlens: int32 [B+1], cumulative sequence starts, cu_seqlens[-1] == T; zero-length entries allowed.
    max_seqlen: python int >= every length (sizes the grid; never read back from the device; a smaller value
        leaves rows uncomputed).
    softmax_scale: default 1/sqrt(D). dropout_p: probability of dropping an attention probability (train only).
    causal: query i sees only keys j <= i of its sequence (decoders as trained; Qwen3-Embedding).
    window: int >= 1 or None. Query i sees only keys with |i - j| < window (positions within the sequence); with
        causal, keys i - window < j <= i. Hugging Face's sliding-window layers (Gemma 2/3, Qwen3, Mistral).
    softcap: positive float or None. Logits s = scale * q.k become softcap * tanh(s / softcap) before masking
        and softmax (Gemma 2's attn_logit_softcapping).
    deterministic: accepted for API compatibility; the Triton backward is always deterministic (no atomics).
    force_triton: run the Triton kernels on CPU tensors too (Triton interpreter, for tests).
    Under torch.autocast, q, k, v are first cast to the autocast dtype as SDPA casts them (float64 excepted).
    Returns out [T, Hq, D] in q's dtype (the autocast dtype under autocast); differentiable w.r.t. q, k, v.
    """
    q, k, v = _autocast_inputs(q, k, v)
    _check_inputs(q, k, v, cu_seqlens)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    causal, window, softcap = _check_mask_options(causal, window, softcap)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.device.type != "cuda" and not force_triton:
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p, causal, window, softcap)
    require_triton("varlen_attention on a CUDA tensor")
    q, k, v = _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v)
    _check_int32_offsets(max_seqlen, q, k, v)
    cu_seqlens = cu_seqlens.to(torch.int32)
    if window is not None and window >= max_seqlen:
        window = None  # no sequence is longer than max_seqlen: the window restricts nothing (one compile fewer)
    rng = draw_dropout_rng(q.device) if dropout_p > 0.0 else None
    out, _ = varlen_attention_forward_op(q, k, v, cu_seqlens, int(max_seqlen), float(scale), float(dropout_p), rng,
                                         causal, window, softcap)
    return out


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


def naive_varlen_attention(q, k, v, cu_seqlens, softmax_scale=None, dropout_mask=None, *, dropout_p=None,
                           causal=False, window=None, softcap=None, float32_softmax=False):
    """Reference: a plain loop over sequences, softmax(q k^T * scale) v per sequence, in the inputs' dtype (run
    it in float64 for ground truth). dropout_mask: optional list of per-sequence [Hq, L, L] masks applied to the
    probabilities, either float (already 0 or 1/(1-p)) or bool keep-masks with ``dropout_p`` given. causal,
    window, softcap as in ``varlen_attention``: the logits are capped, then masked (-inf), then softmaxed.
    float32_softmax: the softmax in at least float32, cast back to the inputs' dtype, as Hugging Face's eager
    attention computes it (the same-precision baseline of the C++ op's tests and benchmark)."""
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
        s_ij = (qi @ ki.transpose(1, 2)) * scale  # [HQ, L, L]
        if softcap is not None:
            s_ij = softcap * torch.tanh(s_ij / softcap)
        band = _band_mask(e - s, causal, window, q.device)
        if band is not None:
            s_ij = s_ij.masked_fill(~band, float("-inf"))
        if float32_softmax:
            p = torch.softmax(s_ij, dim=-1, dtype=torch.promote_types(s_ij.dtype, torch.float32)).to(s_ij.dtype)
        else:
            p = torch.softmax(s_ij, dim=-1)  # [HQ, L, L]
        if dropout_mask is not None:
            m = dropout_mask[i].to(q.device)
            if m.dtype == torch.bool:
                m = m.to(p.dtype) / (1.0 - dropout_p)
            p = p * m.to(p.dtype)
        outs.append((p @ vi).transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros(0, HQ, D)
