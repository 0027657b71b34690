"""The C++ CPU ops against their PyTorch counterparts, then end-to-end encode with and without them, in one run.

    python benchmarks/bench_native.py [--dtypes float32 bfloat16] [--sentences 150] [--paragraphs 8]
                                      [--rounds 3] [--no-reference] [--out benchmarks/results/native_cpu.json]

Per op (shapes of the embedded SmolLM2-135M at the default CPU token budget, 1,024 tokens; attention on the real
packed lengths of the first encode batch): the PyTorch expression the patch layer replaces is the baseline, the
C++ op must pass its correctness check (error vs float64 at most twice PyTorch's) before it gets a time.
End to end: `encode` of `bench_encode.benchmark_texts` with the native ops off and on, alternated `--rounds` times
(the machine is shared: alternating keeps the ratio fair), plus the llm2vec 0.2.3 algorithm once as the reference.
The matmul ceiling is measured in the same run: torch's F.linear on the model's seven projection shapes at 1,024
tokens; tokens/s at the ceiling = tokens / (layers x time of one layer's projections). An op that does not beat
PyTorch here is not in cpu_runtime.SHIPPED_NATIVE_OPS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts  # noqa: E402
from harness import Bench  # noqa: E402
from reference_encode import reference_encode  # noqa: E402

from llm2vec_fast import LLM2Vec, cpu_ops, native  # noqa: E402
from llm2vec_fast.batching import token_budget_batches  # noqa: E402
from llm2vec_fast.kernels.attention import _torch_varlen_attention, naive_varlen_attention  # noqa: E402
from llm2vec_fast.cpu_runtime import use_native_cpu_ops  # noqa: E402

TOKENS = 1024


def _within_rule(ours, same, truth):
    ours_err = (ours.double() - truth).abs().max().item()
    ref_err = (same.double() - truth).abs().max().item()
    ok = ours_err <= 2 * ref_err + 1e-6 * max(1.0, truth.abs().max().item())
    return ok, f"max err {ours_err:.2e} (PyTorch {ref_err:.2e})"


def add_row(bench, op, backend, shape, times_ms, *, baseline=False, flops=None, nbytes=None, tokens=None,
            correct=None, note=""):
    """A harness row from times measured here (median, p20, p80); no time or rate when correct is False."""
    qs = statistics.quantiles(times_ms, n=5) if len(times_ms) >= 2 else [times_ms[0]] * 4
    ms = statistics.median(times_ms)
    if flops is not None:
        rate, unit = flops / ms / 1e9, "TFLOP/s"
    elif nbytes is not None:
        rate, unit = nbytes / ms / 1e6, "GB/s"
    else:
        rate, unit = tokens / ms * 1e3, "tokens/s"
    row = dict(device=bench.device_name, commit=bench.commit, op=op, backend=backend, shape=shape, ms=ms,
               ms_p20=qs[0], ms_p80=qs[3], n=len(times_ms), rate=rate, unit=unit, ratio=None, peak_mib=None,
               correct=correct, baseline=baseline, note=note)
    if correct is False:
        row.update(ms=None, rate=None, note=f"CORRECTNESS FAILED {note}")
    bench.rows.append(row)
    bench._ratios()
    return row


def paired(bench, op, shape, baseline, ours, check, rounds=40, **rate):
    """Time the PyTorch baseline and the C++ op alternately (the machine is shared), after ours passed check."""
    ok, note = check()
    (base_name, base_fn), (our_name, our_fn) = baseline, ours
    for _ in range(3):
        base_fn(), our_fn()
    times = ([], [])
    for _ in range(rounds):
        for fn, sink in ((base_fn, times[0]), (our_fn, times[1])):
            t0 = time.perf_counter()
            fn()
            sink.append((time.perf_counter() - t0) * 1e3)
    add_row(bench, op, base_name, shape, times[0], baseline=True, **rate)
    add_row(bench, op, our_name, shape, times[1], correct=ok, note=note, **rate)


def hf_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def hf_rotary(q, k, cos, sin):
    """apply_rotary_pos_emb in the attention module's layout: q [1, H, T, D] views, cos [1, T, D]."""
    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def eager_masked_attention(q, k, v, cu_seqlens, scale, causal, window, softcap):
    """Hugging Face's eager attention (Gemma 2's: scaled scores, softcap, -inf outside the causal window, softmax in
    float32) on each packed sequence: q [T, Hq, D], k / v [T, Hkv, D]."""
    return naive_varlen_attention(q, k, v, cu_seqlens, scale, causal=causal, window=window, softcap=softcap,
                                  float32_softmax=True)


def bench_ops(bench, config, dtype, batches):
    """batches: the packed sequence lengths of each encode batch (attention runs on all of them, as encode does)."""
    lengths = max(batches, key=max)
    H, I, D = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    HQ, HKV, eps = config.num_attention_heads, config.num_key_value_heads, config.rms_norm_eps
    g = torch.Generator().manual_seed(0)
    name = str(dtype).replace("torch.", "")
    x = torch.randn(TOKENS, H, generator=g).to(dtype)
    residual = torch.randn(TOKENS, H, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    elementwise_bytes = TOKENS * H * x.element_size()

    shape = dict(op="rms_norm", T=TOKENS, H=H, dtype=name)
    paired(bench, "rms_norm", shape, ("pytorch", lambda: hf_rms_norm(x, weight, eps)),
           ("cpp", lambda: cpu_ops.rms_norm(x, weight, eps)), nbytes=2 * elementwise_bytes,
           check=lambda: _within_rule(cpu_ops.rms_norm(x, weight, eps), hf_rms_norm(x, weight, eps),
                                         hf_rms_norm(x.double(), weight.double(), eps)))

    shape = dict(op="add_rms_norm", T=TOKENS, H=H, dtype=name)
    paired(bench, "add_rms_norm", shape, ("pytorch", lambda: hf_rms_norm(residual + x, weight, eps)),
           ("cpp", lambda: cpu_ops.rms_norm(x, weight, eps, residual=residual)), nbytes=4 * elementwise_bytes,
           check=lambda: _within_rule(cpu_ops.rms_norm(x, weight, eps, residual=residual)[0],
                                         hf_rms_norm(residual + x, weight, eps),
                                         hf_rms_norm((residual + x).double(), weight.double(), eps)))

    q = torch.randn(1, TOKENS, HQ * D, generator=g).to(dtype).view(1, TOKENS, HQ, D).transpose(1, 2)
    k = torch.randn(1, TOKENS, HKV * D, generator=g).to(dtype).view(1, TOKENS, HKV, D).transpose(1, 2)
    angles = torch.arange(TOKENS)[:, None] % 97 * torch.rand(D // 2, generator=g)[None, :]
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1)[None].to(dtype) for f in (torch.cos, torch.sin))
    rotary_bytes = 2 * TOKENS * (HQ + HKV) * D * x.element_size()
    shape = dict(op="rotary", T=TOKENS, HQ=HQ, HKV=HKV, D=D, dtype=name)

    def ours_rotary():
        return cpu_ops.rotary(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0])

    def rotary_check():
        ours = ours_rotary()
        same = [t[0].transpose(0, 1) for t in hf_rotary(q, k, cos, sin)]
        truth = [t[0].transpose(0, 1) for t in hf_rotary(q.double(), k.double(), cos.double(), sin.double())]
        checks = [_within_rule(a, b, t) for a, b, t in zip(ours, same, truth)]
        return all(c[0] for c in checks), "; ".join(c[1] for c in checks)

    paired(bench, "rotary", shape, ("pytorch", lambda: hf_rotary(q, k, cos, sin)), ("cpp", ours_rotary),
           nbytes=rotary_bytes, check=rotary_check)

    gate = (2 * torch.randn(TOKENS, I, generator=g)).to(dtype)
    up = torch.randn(TOKENS, I, generator=g).to(dtype)
    silu_bytes = 3 * TOKENS * I * x.element_size()
    shape = dict(op="silu_mul", T=TOKENS, I=I, dtype=name)
    paired(bench, "silu_mul", shape, ("pytorch", lambda: F.silu(gate) * up),
           ("cpp", lambda: cpu_ops.silu_mul(gate, up)), nbytes=silu_bytes,
           check=lambda: _within_rule(cpu_ops.silu_mul(gate, up), F.silu(gate) * up,
                                         F.silu(gate.double()) * up.double()))

    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    qa = torch.randn(T, HQ, D, generator=g).to(dtype)
    ka = torch.randn(T, HKV, D, generator=g).to(dtype)
    va = torch.randn(T, HKV, D, generator=g).to(dtype)
    scale = D ** -0.5
    flops = 4 * HQ * D * sum(n * n for n in lengths)
    shape = dict(op="varlen_attention", T=T, seqs=len(lengths), max_len=max(lengths), HQ=HQ, HKV=HKV, D=D,
                 dtype=name)
    paired(bench, "varlen_attention", shape,
           ("pytorch-grouped-sdpa", lambda: _torch_varlen_attention(qa, ka, va, cu, max(lengths), scale, 0.0)),
           ("cpp", lambda: cpu_ops.varlen_attention(qa, ka, va, cu, scale)), flops=flops, rounds=15,
           check=lambda: _within_rule(cpu_ops.varlen_attention(qa, ka, va, cu, scale),
                                         _torch_varlen_attention(qa, ka, va, cu, max(lengths), scale, 0.0),
                                         naive_varlen_attention(qa.double(), ka.double(), va.double(),
                                                                            cu, scale)))

    # A Gemma 2 sliding layer's call on the same pack (causal, a 64-token window, logit softcap 50): PyTorch's eager
    # attention per sequence (what transformers runs for a softcapped model) against the C++ op, which computes only
    # the band. FLOPs count the (query, key) pairs the band holds.
    masked = dict(causal=True, window=64, softcap=50.0)
    band = sum(min(i + 1, masked["window"]) for n in lengths for i in range(n))
    shape = dict(op="varlen_attention masked", T=T, seqs=len(lengths), max_len=max(lengths), HQ=HQ, HKV=HKV, D=D,
                 dtype=name, **masked)
    paired(bench, "varlen_attention", shape,
           ("pytorch-eager", lambda: eager_masked_attention(qa, ka, va, cu, scale, **masked)),
           ("cpp", lambda: cpu_ops.varlen_attention(qa, ka, va, cu, scale, **masked)), flops=4 * HQ * D * band,
           rounds=15, check=lambda: _within_rule(cpu_ops.varlen_attention(qa, ka, va, cu, scale, **masked),
                                                 eager_masked_attention(qa, ka, va, cu, scale, **masked),
                                                 eager_masked_attention(qa.double(), ka.double(), va.double(), cu,
                                                                        scale, **masked)))

    # One layer's attention over every batch of the encode: what the encode path actually runs.
    data = []
    for ls in batches:
        n = sum(ls)
        data.append((torch.randn(n, HQ, D, generator=g).to(dtype), torch.randn(n, HKV, D, generator=g).to(dtype),
                     torch.randn(n, HKV, D, generator=g).to(dtype), torch.tensor([0] + ls).cumsum(0).to(torch.int32),
                     max(ls)))
    shape = dict(op="varlen_attention", batches=len(batches), T=sum(map(sum, batches)),
                 seqs=sum(map(len, batches)), HQ=HQ, HKV=HKV, D=D, dtype=name)

    def all_batches(fn):
        return lambda: [fn(*d) for d in data]

    paired(bench, "varlen_attention", shape,
           ("pytorch-grouped-sdpa", all_batches(lambda q, k, v, c, m: _torch_varlen_attention(q, k, v, c, m, scale, 0.0))),
           ("cpp", all_batches(lambda q, k, v, c, m: cpu_ops.varlen_attention(q, k, v, c, scale))), rounds=5,
           flops=4 * HQ * D * sum(n * n for ls in batches for n in ls),
           check=lambda: _within_rule(torch.cat(all_batches(lambda q, k, v, c, m: cpu_ops.varlen_attention(
               q, k, v, c, scale))()), torch.cat(all_batches(lambda q, k, v, c, m: _torch_varlen_attention(
                   q, k, v, c, m, scale, 0.0))()), torch.cat(all_batches(
                       lambda q, k, v, c, m: naive_varlen_attention(
                           q.double(), k.double(), v.double(), c, scale))())))

    # The op's two kernels on the same batches: the portable C++ one (what runs where oneDNN has no micro-GEMMs for
    # this CPU) against the brgemm one (the default where it does).
    def portable(q, k, v, c, m):
        return cpu_ops.varlen_attention(q, k, v, c, scale, kernel="portable")

    paired(bench, "varlen_attention", dict(shape, op="varlen_attention kernels"),
           ("cpp-portable", all_batches(portable)),
           ("cpp", all_batches(lambda q, k, v, c, m: cpu_ops.varlen_attention(q, k, v, c, scale))), rounds=5,
           flops=4 * HQ * D * sum(n * n for ls in batches for n in ls),
           check=lambda: _within_rule(torch.cat(all_batches(lambda q, k, v, c, m: cpu_ops.varlen_attention(
               q, k, v, c, scale))()), torch.cat(all_batches(portable)()), torch.cat(all_batches(
                   lambda q, k, v, c, m: naive_varlen_attention(
                       q.double(), k.double(), v.double(), c, scale))())))


def matmul_ceiling(bench, config, dtype):
    """Tokens/s if encode were only the model's projections, run by torch at TOKENS tokens."""
    H, I, D = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads * D
    shapes = [(H, H), (kv, H), (kv, H), (H, H), (I, H), (I, H), (H, I)]  # q k v o gate up down: (out, in)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, k, generator=g).to(dtype) * 0.02 for n, k in shapes]
    inputs = {k: torch.randn(TOKENS, k, generator=g).to(dtype) for _, k in shapes}
    flops = sum(2 * TOKENS * n * k for n, k in shapes)

    def layer():
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    row = bench.run("matmul_ceiling", "torch-linear", dict(op="matmul_ceiling", T=TOKENS, dtype=str(dtype)[6:]),
                    layer, flops=flops, baseline=True)
    return TOKENS / (config.num_hidden_layers * row["ms"] / 1e3), row["rate"] * 1e3


def bench_encode(bench, encoder, texts, tokens, dtype, rounds, truth, with_reference):
    """Alternate native off / on `rounds` times; rows with tokens/s and the ratio to the native-off median."""
    name = str(dtype).replace("torch.", "")
    shape = dict(op="encode", texts=len(texts), tokens=tokens, dtype=name)
    times = {False: [], True: []}
    outputs = {}
    encoder.encode(texts[:16], show_progress_bar=False)
    for _ in range(rounds):
        for on in (False, True):
            use_native_cpu_ops(encoder.model, enable=on)
            encoder.encode(texts[:8], show_progress_bar=False)
            t0 = time.perf_counter()
            outputs[on] = encoder.encode(texts, show_progress_bar=False)
            times[on].append((time.perf_counter() - t0) * 1e3)
    cosine = torch.nn.functional.cosine_similarity
    if truth is None:  # float32: native vs PyTorch ops agree
        worst = cosine(outputs[True], outputs[False], dim=-1).min().item()
        ok, note = worst > 0.99999, f"min cosine(native, pytorch) {worst:.7f}"
    else:
        errors = {on: (1 - cosine(outputs[on], truth, dim=-1)).max().item() for on in (False, True)}
        ok = errors[True] <= 2 * errors[False] + 1e-6
        note = f"max 1-cosine to float32: native {errors[True]:.2e}, pytorch {errors[False]:.2e}"
    if with_reference:
        use_native_cpu_ops(encoder.model, enable=False)
        reference_encode(encoder, texts[:8])
        t0 = time.perf_counter()
        reference_encode(encoder, texts)
        add_row(bench, "encode", "llm2vec-0.2.3-algo", shape, [(time.perf_counter() - t0) * 1e3], tokens=tokens,
                note="reference algorithm, PyTorch ops, one run")
    for on in (False, True):
        add_row(bench, "encode", "llm2vec-fast+cpp" if on else "llm2vec-fast", shape, times[on], baseline=not on,
                tokens=tokens, correct=ok if on else None, note=note if on else "")
    bench._ratios()
    use_native_cpu_ops(encoder.model, enable=True)
    return outputs[False]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sentences", type=int, default=150)
    parser.add_argument("--paragraphs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if native.load() is None:
        print("C++ ops unavailable; nothing to benchmark")
        return 1
    texts = benchmark_texts(args.sentences, args.paragraphs)
    bench = Bench("cpu", warmup=3, repeats=30, max_seconds=5.0)
    summary = {}
    truth = None
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        encoder = LLM2Vec.from_pretrained(args.model, dtype=dtype)
        rows = encoder.tokenize_inputs(texts)
        tokens = sum(len(r) for r in rows)
        batches = [[len(rows[i]) for i in b] for b in token_budget_batches([len(r) for r in rows], TOKENS)]
        with torch.inference_mode():
            bench_ops(bench, encoder.config, dtype, batches)
        ceiling_tps, ceiling_gflops = matmul_ceiling(bench, encoder.config, dtype)
        plain = bench_encode(bench, encoder, texts, tokens, dtype, args.rounds,
                             truth if dtype_name != "float32" else None, not args.no_reference)
        if dtype_name == "float32":
            truth = plain
        by_backend = {r["backend"]: r for r in bench.rows if r["op"] == "encode" and r["shape"]["dtype"] == dtype_name}
        fast, base = by_backend["llm2vec-fast+cpp"], by_backend["llm2vec-fast"]
        ref = by_backend.get("llm2vec-0.2.3-algo")
        summary[dtype_name] = dict(
            tokens=tokens, matmul_ceiling_tokens_per_s=ceiling_tps, matmul_ceiling_gflops=ceiling_gflops,
            pytorch_ops_tokens_per_s=base["rate"], cpp_ops_tokens_per_s=fast["rate"], cpp_vs_pytorch_ratio=fast["ratio"],
            cpp_share_of_ceiling=fast["rate"] / ceiling_tps if fast["rate"] else None,
            pytorch_share_of_ceiling=base["rate"] / ceiling_tps,
            reference_tokens_per_s=ref["rate"] if ref else None,
            cpp_vs_reference_ratio=fast["rate"] / ref["rate"] if ref and fast["rate"] else None)
        del encoder
    bench.print_table()
    for dtype_name, s in summary.items():
        print(f"{dtype_name}: encode {s['pytorch_ops_tokens_per_s']:.0f} -> {s['cpp_ops_tokens_per_s'] or 0:.0f} tok/s "
              f"(x{s['cpp_vs_pytorch_ratio'] or 0:.2f}); matmul ceiling {s['matmul_ceiling_tokens_per_s']:.0f} tok/s "
              f"({s['matmul_ceiling_gflops']:.0f} GFLOP/s), share {100 * (s['cpp_share_of_ceiling'] or 0):.0f}% "
              f"(PyTorch ops {100 * s['pytorch_share_of_ceiling']:.0f}%)"
              + (f"; vs reference algorithm x{s['cpp_vs_reference_ratio']:.2f}" if s["cpp_vs_reference_ratio"] else ""))
    if args.out:
        bench.save(args.out, extra=dict(model=args.model, texts=len(texts), threads=torch.get_num_threads(),
                                        native_source=native.source(), summary=summary,
                                        time=time.strftime("%Y-%m-%d %H:%M:%S")))
    return 1 if bench.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
