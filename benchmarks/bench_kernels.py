"""Kernel benchmark: varlen attention vs torch SDPA backends, segment pooling vs PyTorch.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json [--quick]

GPU: our Triton attention against every SDPA backend that runs (flash, efficient, cudnn; padded to the longest
sequence with a key-padding mask for mixed lengths, counted with the useful FLOPs 4*H*D*sum(s_i^2), backward
2.5x forward), and the packed varlen peers where installed (torch.nn.attention.varlen.varlen_attn, flash_attn's
flash_attn_varlen_func), head dims 64 and 128, sequence lengths 128..8192, uniform and mixed-length batches;
pooling GB/s against a PyTorch implementation. CPU (no GPU, or --cpu): small sizes, our CPU dispatch path against plain
PyTorch alternatives; the Triton interpreter is not timed (it measures nothing about the kernels).
"""

import argparse
import inspect
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402

from llm2vec_fast.kernels import attention as attn_mod  # noqa: E402
from llm2vec_fast.kernels.attention import varlen_attention  # noqa: E402
from llm2vec_fast.kernels.pooling import _torch_segment_pool, naive_segment_pool, segment_pool  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def attention_flops(heads, head_dim, lengths):
    return 4 * heads * head_dim * sum(s * s for s in lengths)


def make_lengths(kind, seqlen, total_tokens, rng):
    if kind == "uniform":
        return [seqlen] * max(1, total_tokens // seqlen)
    lengths = []  # mixed: uniform in [seqlen/8, seqlen], the longest exactly seqlen
    while sum(lengths) < total_tokens - seqlen:
        lengths.append(rng.randint(max(1, seqlen // 8), seqlen))
    return lengths + [seqlen]


def packed_inputs(lengths, hq, hkv, d, dtype, device, requires_grad=False):
    T = sum(lengths)
    q = torch.randn(T, hq, d, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(T, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(T, hkv, d, dtype=dtype, device=device, requires_grad=requires_grad)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu


def pad(x, lengths):
    """[T, H, D] packed -> [B, H, S, D] zero-padded (a detached leaf)."""
    S = max(lengths)
    out = x.new_zeros(len(lengths), S, x.shape[1], x.shape[2])
    for i, (s, n) in enumerate(zip([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()), lengths)):
        out[i, :n] = x[s:s + n]
    return out.transpose(1, 2).contiguous().detach().requires_grad_(x.requires_grad)


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def _grouped_varlen_attn(varlen_attn):
    """torch's varlen_attn as fn(q, k, v, cu, S) for grouped K/V heads: through its ``enable_gqa`` where it has
    one (torch >= 2.12), else with K/V repeated to the query heads first (torch 2.11), as SDPA's GQA does."""
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return lambda q, k, v, cu, S: varlen_attn(q, k, v, cu, cu, S, S, enable_gqa=q.shape[1] != k.shape[1])

    def repeated(q, k, v, cu, S):
        group = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))  # [T, HQ, D]
        return varlen_attn(q, k, v, cu, cu, S, S)

    return repeated


def packed_peers():
    """name -> fn(q, k, v, cu_seqlens, max_seqlen) for the packed varlen attentions installed: torch's
    ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10) and ``flash_attn.flash_attn_varlen_func``."""
    peers = {}
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pass
    else:
        peers["torch-varlen_attn"] = _grouped_varlen_attn(varlen_attn)
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        pass
    else:
        peers["flash_attn-varlen"] = lambda q, k, v, cu, S: flash_attn_varlen_func(q, k, v, cu, cu, S, S,
                                                                                   causal=False)
    return peers


def bench_attention_gpu(bench, dtype, d, heads, kind, seqlen, total_tokens, backward, rng):
    from torch.nn.attention import sdpa_kernel

    device = bench.device
    lengths = make_lengths(kind, seqlen, total_tokens, rng)
    q, k, v, cu = packed_inputs(lengths, heads, heads, d, dtype, device, requires_grad=backward)
    do = torch.randn_like(q)
    S = max(lengths)
    flops = attention_flops(heads, d, lengths) * (3.5 if backward else 1.0)
    op = "attn_fwdbwd" if backward else "attn_fwd"
    dname = str(dtype).replace("torch.", "")
    shape = f"{kind}-B{len(lengths)}-S{S}-T{sum(lengths)}-H{heads}-D{d}-{dname}"

    qp, kp, vp = (pad(x, lengths) for x in (q, k, v))
    dop = pad(do, lengths).detach()
    mask = None
    if kind != "uniform":
        mask = (torch.arange(S, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])
        mask = mask[:, None, None, :]

    for name, backend in sdpa_backends().items():
        def sdpa_fn(backend=backend):
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
                if backward:
                    torch.autograd.grad(out, (qp, kp, vp), dop)
            return out
        bench.run(op, f"sdpa-{name}", shape, sdpa_fn, flops=flops, baseline=True)

    # Packed (no padding) peers: torch's own varlen flash attention and the flash_attn package, where present.
    for name, fn in packed_peers().items():
        def peer(fn=fn):
            out = fn(q, k, v, cu, S)
            if backward:
                torch.autograd.grad(out, (q, k, v), do)
            return out
        bench.run(op, name, shape, peer, flops=flops, baseline=True)

    def ours():
        out = varlen_attention(q, k, v, cu, S)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)
        return out

    def check():
        # Reference: the same maths in fp32 through PyTorch (pad + SDPA with mask), on a few heads.
        hs = slice(0, min(heads, 2))
        qs, ks, vs = (x.detach()[:, hs].contiguous() for x in (q, k, v))
        ref = attn_mod._torch_varlen_attention(qs.float(), ks.float(), vs.float(), cu, S, d ** -0.5, 0.0)
        got = varlen_attention(qs, ks, vs, cu, S)
        err = (got.float() - ref).abs().max().item()
        return err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max err {err:.2e}"

    bench.run(op, "ours-triton", shape, ours, flops=flops, check=check, ours=True)


def bench_pooling(bench, dtype, T, H, seg_len, mode, use_triton):
    device = bench.device
    B = T // seg_len
    x = torch.randn(T, H, dtype=dtype, device=device)
    starts = torch.arange(B, device=device, dtype=torch.int32) * seg_len
    ends = starts + seg_len
    nbytes = T * H * x.element_size() + B * H * x.element_size()
    shape = f"B{B}-L{seg_len}-T{T}-H{H}-{str(dtype).replace('torch.', '')}-{mode}"
    w = torch.arange(1, seg_len + 1, device=device, dtype=torch.float32)
    w = w / w.sum() if mode == "weighted_mean" else torch.full_like(w, 1.0 / seg_len)

    def reshape_torch():
        return (x.view(B, seg_len, H).float() * w[None, :, None]).sum(1).to(dtype)

    bench.run("pool_fwd", "torch-reshape", shape, reshape_torch, nbytes=nbytes, baseline=True)
    bench.run("pool_fwd", "torch-index_add", shape,
              lambda: _torch_segment_pool(x, starts, ends, mode == "weighted_mean", dtype), nbytes=nbytes)

    def check():
        got = segment_pool(x, starts, ends, mode, force_triton=use_triton).double()
        ref = naive_segment_pool(x.double(), starts, ends, mode)
        err = (got - ref).abs().max().item()
        return err <= TOL[dtype], f"max err {err:.2e}"

    bench.run("pool_fwd", "ours-triton" if use_triton else "ours-cpu-path", shape,
              lambda: segment_pool(x, starts, ends, mode, force_triton=use_triton), nbytes=nbytes,
              check=check if device.type == "cuda" or not use_triton else None, ours=True)


def bench_attention_cpu(bench, dtype, d, heads, lengths, backward):
    q, k, v, cu = packed_inputs(lengths, heads, heads, d, dtype, "cpu", requires_grad=backward)
    do = torch.randn_like(q)
    S = max(lengths)
    flops = attention_flops(heads, d, lengths) * (3.5 if backward else 1.0)
    op = "attn_fwdbwd" if backward else "attn_fwd"
    shape = f"B{len(lengths)}-S{S}-T{sum(lengths)}-H{heads}-D{d}-{str(dtype).replace('torch.', '')}"
    bounds = cu.tolist()

    def per_sequence():
        outs = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                               v[s:e].transpose(0, 1)).transpose(0, 1)
                for s, e in zip(bounds[:-1], bounds[1:])]
        out = torch.cat(outs)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)
        return out

    def ours():
        out = varlen_attention(q, k, v, cu, S)
        if backward:
            torch.autograd.grad(out, (q, k, v), do)
        return out

    def check():
        with torch.no_grad():
            ref = torch.cat([F.scaled_dot_product_attention(q[s:e].transpose(0, 1).double(), k[s:e].transpose(0, 1).double(),
                                                            v[s:e].transpose(0, 1).double()).transpose(0, 1)
                             for s, e in zip(bounds[:-1], bounds[1:])])
            err = (varlen_attention(q, k, v, cu, S).double() - ref).abs().max().item()
        return err <= TOL[dtype], f"max err {err:.2e}"

    bench.run(op, "torch-per-seq-sdpa", shape, per_sequence, flops=flops, baseline=True)
    bench.run(op, "ours-cpu-path", shape, ours, flops=flops, check=check, ours=True)


def run_gpu(bench, quick=False):
    rng = random.Random(0)
    seqlens = [128, 512, 1024, 2048, 4096, 8192] if not quick else [512, 1024, 4096, 8192]
    total = 32768 if not quick else 16384
    dtypes = [torch.bfloat16, torch.float16] if not quick else [torch.bfloat16]
    for dtype in dtypes:
        for d, heads in ((128, 16), (64, 32)):
            for kind in ("uniform", "mixed"):
                for seqlen in seqlens:
                    if kind == "mixed" and quick and seqlen not in (1024, 4096):
                        continue
                    for backward in (False, True):
                        bench_attention_gpu(bench, dtype, d, heads, kind, seqlen, max(total, seqlen), backward, rng)
                        torch.cuda.empty_cache()
    for dtype in dtypes:
        for mode in ("mean", "weighted_mean"):
            for T, H, L in ((65536, 4096, 512), (16384, 4096, 16384)):
                bench_pooling(bench, dtype, T, H, L, mode, use_triton=True)


def run_cpu(bench):
    for dtype in (torch.float32, torch.bfloat16):
        for lengths in ([128] * 8, [37, 250, 12, 129, 77, 200, 5, 256], [512, 31]):
            for backward in (False, True):
                bench_attention_cpu(bench, dtype, 64, 4, lengths, backward)
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("mean", "weighted_mean"):
            bench_pooling(bench, dtype, 4096, 576, 128, mode, use_triton=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/kernels.json", help="results file (.json or .csv)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (the gpu_check subset)")
    parser.add_argument("--cpu", action="store_true", help="CPU benchmark even when a GPU is present")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    bench = Bench("cuda" if cuda else "cpu", repeats=20 if cuda else 5, max_seconds=5.0 if cuda else 2.0)
    if cuda:
        run_gpu(bench, quick=args.quick)
    else:
        print("# no GPU (or --cpu): timing the CPU dispatch paths at small sizes; Triton kernels are not timed")
        run_cpu(bench)
    bench.print_table()
    print(f"# wrote {bench.save(args.out, extra=dict(mode='gpu' if cuda else 'cpu', quick=args.quick))}")
    return 1 if bench.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
