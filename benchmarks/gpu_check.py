"""One-shot GPU check: correctness at real sizes, then benchmarks, in well under 8 minutes on an H200.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json [--sections attention,pooling] [--budget-s 480]
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json

Sections run in order of value (``SECTIONS``), each in isolation: one that raises is recorded as failed with its
traceback and the next one runs. The results file is rewritten (temp file + rename) after every check, every
benchmark row and every section, so a lease that ends mid-run keeps everything measured so far. ``--budget-s``
is a wall-clock budget: once it is spent, the sections not yet started are recorded as skipped. The correctness
sections check the Triton attention (forward, dQ/dK/dV; GQA; varlen with empty and length-1 entries; head dims
64/80/128/256; an 8k sequence; re-run bitwise), its dropout (gradients against the naive reference with the
identical mask, determinism, rate) and pooling, in bf16/fp16 against float64 references. ``kernel_bench`` times
attention and pooling (``bench_kernels.run_gpu(quick=True)``; every row checks its own output and refuses a
speed when that fails) and reports the targets; ``attention_sweep`` times a few tilings, only once the
``attention`` section has passed. ``kernels`` names all five kernel sections. A failed check or section makes
the exit status 1. ``--cpu-smoke`` runs the same code at toy sizes on the CPU (Triton interpreter).

To add a section: write ``def my_section(ctx) -> dict`` and register it in SECTIONS; use ``ctx.check(...)`` for
pass/fail rows, ``ctx.bench`` (a harness.Bench) for timings, and raise ``SectionSkipped`` to skip with a reason.
"""

import argparse
import json
import os
import sys
import time
import traceback

if "--cpu-smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402
from harness import Bench  # noqa: E402

from llm2vec_fast.kernels import attention as attn_mod  # noqa: E402
from llm2vec_fast.kernels.attention import (  # noqa: E402
    naive_varlen_attention,
    varlen_attention,
    varlen_attention_dropout_mask,
)
from llm2vec_fast.kernels.pooling import POOLING_MODES, naive_segment_pool, segment_pool  # noqa: E402

# Absolute floors on top of "2x the error of the same-precision PyTorch computation".
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Targets (H200, bf16, non-causal, head dim 128, S >= 1k).
TARGET_FWD_TFLOPS = 400.0
TARGET_FWD_VS_SDPA = 1.0
TARGET_FWDBWD_TFLOPS = 300.0
TARGET_POOL_GBS = 0.8 * 4300.0


class SectionSkipped(Exception):
    """Raised by a section that cannot run meaningfully (its reason is recorded)."""


class SavingBench(Bench):
    """A harness.Bench that saves the results file after every row it measures."""

    def __init__(self, device, on_row, **kwargs):
        super().__init__(device, **kwargs)
        self.on_row = on_row

    def run(self, *args, **kwargs):
        row = super().run(*args, **kwargs)
        self.on_row(row)
        return row


class Context:
    """What the sections share: the device, the checks and benchmark rows so far, each section's status, and the
    results file, rewritten atomically by ``save`` whenever one of them changes."""

    def __init__(self, device, smoke, out=None, budget_s=None):
        self.device = torch.device(device)
        self.smoke = smoke
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.time()
        self.checks = []
        self.sections = {}  # name -> dict(status=pending|running|ok|failed|skipped, seconds, summary, error)
        self.current = None
        self.bench = SavingBench(self.device, self._bench_row, repeats=20 if not smoke else 2, max_seconds=3.0)
        self.lines = None
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            # Every check, benchmark row and section end as one JSON line, flushed at once: what a lease cut off
            # mid-write leaves is every complete line before it.
            self.lines = open(os.path.splitext(out)[0] + ".jsonl", "a", buffering=1)

    def log(self, kind, row):
        if self.lines:
            self.lines.write(json.dumps(dict(kind=kind, t=round(time.time() - self.t0, 2), **row), default=str)
                             + "\n")
            self.lines.flush()

    def _bench_row(self, row):
        self.log("bench", dict(row, section=self.current))
        self.save()

    def check(self, name, ok, **info):
        row = dict(check=name, ok=bool(ok), section=self.current, **info)
        self.checks.append(row)
        print(f"[{'PASS' if ok else 'FAIL'}] {name} " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        self.log("check", row)
        self.save()
        return row

    def passed(self, section):
        """True when ``section`` ran to its end in this run with no failed check."""
        return (self.sections.get(section, {}).get("status") == "ok"
                and all(c["ok"] for c in self.checks if c["section"] == section))

    def failed(self):
        """Failed checks, benchmark rows whose correctness check failed, and sections that raised."""
        return ([c for c in self.checks if not c["ok"]] + self.bench.failures()
                + [dict(section=n) for n, s in self.sections.items() if s["status"] == "failed"])

    def results(self):
        return dict(device=self.bench.device_name, commit=self.bench.commit, torch=torch.__version__,
                    seconds=time.time() - self.t0, budget_s=self.budget_s, sections=self.sections,
                    checks=self.checks, bench=self.bench.rows, failed=len(self.failed()))

    def save(self):
        if not self.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = f"{self.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.results(), f, indent=1, default=str)
        os.replace(tmp, self.out)


def _rel_rule(ctx, name, got, ref64, reflp, dtype):
    finite = bool(torch.isfinite(got).all())
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (reflp.double() - ref64).abs().max().item() if got.numel() else 0.0
    bound = 2 * base + FLOOR[dtype]
    return ctx.check(name, finite and err <= bound, err=f"{err:.3e}", bound=f"{bound:.3e}")


def _grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do.to(out.dtype)))


def check_attention_case(ctx, lengths, hq, hkv, d, dtype, dropout_p=0.0):
    dev = ctx.device
    T = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(len(lengths) * 1000 + d)
    q, k, v, do = (torch.randn(T, h, d, generator=g, device=dev, dtype=torch.float64).to(dtype)
                   for h in (hq, hkv, hkv, hq))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    S = max(lengths)
    force = dev.type != "cuda"
    mask = None
    if dropout_p:
        torch.manual_seed(11)
    got = _grads(lambda q, k, v: varlen_attention(q, k, v, cu, S, dropout_p=dropout_p, force_triton=force),
                 q, k, v, do)
    if dropout_p:
        torch.manual_seed(11)
        mask = varlen_attention_dropout_mask(cu, S, hq, dropout_p, device=dev)
    ref_kw = dict(dropout_mask=mask, dropout_p=dropout_p or None)
    ref64 = _grads(lambda q, k, v: naive_varlen_attention(q, k, v, cu, **ref_kw), q.double(), k.double(),
                   v.double(), do.double())
    reflp = _grads(lambda q, k, v: naive_varlen_attention(q, k, v, cu, **ref_kw), q, k, v, do)
    tag = f"attn B{len(lengths)}-T{T}-S{S}-Hq{hq}-Hkv{hkv}-D{d}-{str(dtype)[6:]}" + (f"-p{dropout_p}" if dropout_p else "")
    for name, a, r64, rlp in zip(("out", "dq", "dk", "dv"), got, ref64, reflp):
        _rel_rule(ctx, f"{tag} {name}", a, r64, rlp, dtype)


def check_dropout_determinism(ctx, dtype):
    dev = ctx.device
    lengths = [300, 0, 1, 1000] if not ctx.smoke else [20, 0, 1, 33]
    T, S = sum(lengths), max(lengths)
    q, k, v = (torch.randn(T, h, 64, device=dev, dtype=dtype) for h in (8, 2, 2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    force = dev.type != "cuda"
    outs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outs.append(varlen_attention(q, k, v, cu, S, dropout_p=0.3, force_triton=force))
    ctx.check(f"dropout same seed bitwise equal {str(dtype)[6:]}", torch.equal(outs[0], outs[1]))
    ctx.check(f"dropout other seed differs {str(dtype)[6:]}", not torch.equal(outs[0], outs[2]))
    masks = varlen_attention_dropout_mask(cu, S, 8, 0.3, device=dev)
    rate = 1 - torch.cat([m.flatten() for m in masks]).float().mean().item()
    ctx.check("dropout observed rate ~ 0.3", abs(rate - 0.3) < 0.01, rate=f"{rate:.4f}")


def check_rerun_bitwise(ctx, dtype):
    dev = ctx.device
    lengths = [700, 1, 0, 2048, 333] if not ctx.smoke else [7, 1, 0, 40]
    T, S = sum(lengths), max(lengths)
    q, k, v, do = (torch.randn(T, h, 128, device=dev, dtype=dtype) for h in (8, 2, 2, 8))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    fn = lambda q, k, v: varlen_attention(q, k, v, cu, S, force_triton=dev.type != "cuda")  # noqa: E731
    a, b = _grads(fn, q, k, v, do), _grads(fn, q, k, v, do)
    ctx.check(f"attn re-run bitwise identical {str(dtype)[6:]}", all(torch.equal(x, y) for x, y in zip(a, b)))


def check_pooling(ctx, dtype):
    dev = ctx.device
    T, H = (20000, 1024) if not ctx.smoke else (300, 64)
    ranges = [(0, 1), (1, T // 3), (T // 3, T // 3), (T // 3 + 5, T // 2), (T // 4, T - 1), (T - 1, T)]
    starts = torch.tensor([r[0] for r in ranges], dtype=torch.int32, device=dev)
    ends = torch.tensor([r[1] for r in ranges], dtype=torch.int32, device=dev)
    x = torch.randn(T, H, device=dev, dtype=torch.float64)
    dout = torch.randn(len(ranges), H, device=dev, dtype=torch.float64)
    for mode in POOLING_MODES:
        def run(xx, fn):
            xx = xx.detach().clone().requires_grad_()
            out = fn(xx)
            return out.detach(), torch.autograd.grad(out, xx, dout.to(out.dtype))[0]
        got = run(x.to(dtype), lambda xx: segment_pool(xx, starts, ends, mode, force_triton=True))
        ref64 = run(x, lambda xx: naive_segment_pool(xx, starts, ends, mode))
        reflp = run(x.to(dtype), lambda xx: naive_segment_pool(xx, starts, ends, mode))
        for name, a, r64, rlp in zip(("out", "dhidden"), got, ref64, reflp):
            _rel_rule(ctx, f"pool {mode} T{T}-H{H}-{str(dtype)[6:]} {name}", a, r64, rlp, dtype)


def report_targets(ctx):
    rows = [r for r in ctx.bench.rows if r["ms"] is not None and "bfloat16" in str(r["shape"])
            and "-D128-" in str(r["shape"])]

    def seqlen(r):
        return int(str(r["shape"]).split("-S")[1].split("-")[0])

    fwd = [r for r in rows if r["op"] == "attn_fwd" and r["backend"] == "ours-triton" and seqlen(r) >= 1024]
    fb = [r for r in rows if r["op"] == "attn_fwdbwd" and r["backend"] == "ours-triton" and seqlen(r) >= 1024]
    pool = [r for r in ctx.bench.rows if r["op"] == "pool_fwd" and r["backend"] == "ours-triton" and r["ms"]]
    summary = dict(
        fwd_tflops_min=min((r["rate"] for r in fwd), default=None),
        fwd_vs_best_sdpa_min=min((r["ratio"] for r in fwd if r["ratio"]), default=None),
        fwdbwd_tflops_min=min((r["rate"] for r in fb), default=None),
        pool_gbs_min=min((r["rate"] for r in pool), default=None),
    )
    met = dict(
        fwd_tflops=summary["fwd_tflops_min"] is not None and summary["fwd_tflops_min"] >= TARGET_FWD_TFLOPS,
        fwd_vs_sdpa=summary["fwd_vs_best_sdpa_min"] is not None and summary["fwd_vs_best_sdpa_min"] >= TARGET_FWD_VS_SDPA,
        fwdbwd_tflops=summary["fwdbwd_tflops_min"] is not None and summary["fwdbwd_tflops_min"] >= TARGET_FWDBWD_TFLOPS,
        pool_gbs=summary["pool_gbs_min"] is not None and summary["pool_gbs_min"] >= TARGET_POOL_GBS,
    )
    print(f"# targets (bf16, D128, S>=1k): {summary} met={met}", flush=True)
    return dict(summary=summary, met=met)


def _check_dtypes(ctx):
    # The interpreter computes bf16 dots wrongly (tests/kernels/conftest.py patches it); the CPU smoke uses fp16.
    return [torch.bfloat16, torch.float16] if ctx.device.type == "cuda" else [torch.float16]


def attention_section(ctx):
    """bf16 then fp16 attention, forward and dQ/dK/dV, against float64: GQA, varlen, head dims 64-256, an 8k row."""
    if ctx.smoke:
        cases = [([1, 0, 17, 40], 4, 2, 64), ([33], 3, 1, 80)]
    else:
        cases = [
            ([1, 0, 777, 1024, 63, 2048], 8, 2, 128),
            ([1000, 1, 513, 0, 257], 12, 4, 64),
            ([129, 1500, 3], 6, 2, 80),
            ([300, 0, 911], 4, 1, 256),
            ([8192], 4, 1, 128),
        ]
    for dtype in _check_dtypes(ctx):
        for lengths, hq, hkv, d in cases:
            check_attention_case(ctx, lengths, hq, hkv, d, dtype)
    check_rerun_bitwise(ctx, _check_dtypes(ctx)[0])
    return {}


def attention_fp32_section(ctx):
    """fp32 inputs on TF32 tensor cores (``attention.fp32_precision()``): error against float64 under the same rule
    as the 16-bit checks, the same-precision computation being PyTorch's fp32 attention with TF32 matmuls allowed
    (``ieee``: without)."""
    cases = [([1, 0, 17, 40], 4, 2, 64)] if ctx.smoke else [([1, 0, 777, 1024, 63], 8, 2, 128),
                                                            ([300, 911], 6, 2, 64)]
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = attn_mod.fp32_precision() != "ieee"
    try:
        for lengths, hq, hkv, d in cases:
            check_attention_case(ctx, lengths, hq, hkv, d, torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return dict(precision=attn_mod.fp32_precision())


def dropout_section(ctx):
    """Attention dropout: gradients against the reference with the identical mask, determinism, the drop rate."""
    dtype = _check_dtypes(ctx)[0]
    check_attention_case(ctx, [300, 0, 1, 700] if not ctx.smoke else [20, 0, 1, 33], 6, 2, 64, dtype,
                         dropout_p=0.3)
    check_dropout_determinism(ctx, dtype)
    return {}


def pooling_section(ctx):
    """Segment pooling (mean, weighted mean, first, last), forward and gradient, against float64."""
    for dtype in _check_dtypes(ctx):
        check_pooling(ctx, dtype)
    return {}


def kernel_bench_section(ctx):
    """Attention against each SDPA backend and pooling in GB/s; each row refuses a speed if its check fails."""
    if ctx.smoke:
        bench_kernels.bench_attention_cpu(ctx.bench, torch.float32, 64, 2, [40, 17, 64], backward=True)
        bench_kernels.bench_pooling(ctx.bench, torch.float32, 512, 64, 64, "mean", use_triton=True)
        return {}
    bench_kernels.run_gpu(ctx.bench, quick=True)
    return report_targets(ctx)


def attention_sweep_section(ctx):
    """Time a few forward / backward tilings at S=4096, D=128, bf16 so the defaults can be revisited. The tiling
    rows carry no check of their own, so they need the attention section to have passed in this run."""
    if not ctx.passed("attention"):
        raise SectionSkipped("needs the attention section to pass in this run")
    if ctx.smoke:
        return {}
    # Tilings that compile without spilling for sm_90, bf16, head dim 128 (python -m
    # llm2vec_fast.kernels.gpu_compile --sweep): the default first, then its neighbours.
    candidates = [
        dict(fwd_bm=128, fwd_bn=64, fwd_warps=8, fwd_stages=3),
        dict(fwd_bm=128, fwd_bn=128, fwd_warps=8, fwd_stages=2),
        dict(fwd_bm=128, fwd_bn=32, fwd_warps=8, fwd_stages=3),
        dict(fwd_bm=64, fwd_bn=64, fwd_warps=4, fwd_stages=3),
        dict(dkdv_bm=32, dkdv_bn=128, dkdv_warps=8, dkdv_stages=2, dq_bm=128, dq_bn=64, dq_warps=8, dq_stages=2),
        dict(dkdv_bm=16, dkdv_bn=128, dkdv_warps=8, dkdv_stages=2, dq_bm=128, dq_bn=32, dq_warps=8, dq_stages=3),
        dict(dkdv_bm=32, dkdv_bn=128, dkdv_warps=8, dkdv_stages=2, dq_bm=64, dq_bn=64, dq_warps=4, dq_stages=3),
    ]
    lengths = [4096] * 4
    q, k, v, cu = bench_kernels.packed_inputs(lengths, 16, 16, 128, torch.bfloat16, ctx.device, requires_grad=True)
    do = torch.randn_like(q)
    flops = bench_kernels.attention_flops(16, 128, lengths)
    for cand in candidates:
        backward = "dkdv_bm" in cand
        attn_mod.CONFIG_OVERRIDE = cand
        try:
            def fn():
                out = varlen_attention(q, k, v, cu, 4096)
                if backward:
                    torch.autograd.grad(out, (q, k, v), do)
            ctx.bench.run("sweep_fwdbwd" if backward else "sweep_fwd", json.dumps(cand, separators=(",", ":")),
                          "uniform-B4-S4096-H16-D128-bf16", fn, flops=flops * (3.5 if backward else 1.0))
        finally:
            attn_mod.CONFIG_OVERRIDE = None
    return {}



def _synthetic_texts(n, seed=0):
    """Mixed lengths like a real corpus: sentences of 5-60 words and, every tenth text, a ~300-word paragraph."""
    from llm2vec_fast.testing import corpus

    sentences = corpus(n * 8, seed=seed, min_words=5, max_words=60)
    return [" ".join(sentences[i * 8:(i + 1) * 8]) if i % 10 == 0 else sentences[i] for i in range(n)]


def _tokenizer():
    import tempfile

    from llm2vec_fast.testing import build_tokenizer

    return build_tokenizer(tempfile.mkdtemp(prefix="gpu_check_tokenizer_"))


def encode_section(ctx):
    """Encode throughput, reference algorithm vs our engine, bf16, on randomly initialised models of real shapes
    (the embedded GGUF does not travel to the GPU machine): SmolLM2-135M and Mistral-7B. MFU against 790 TFLOP/s
    (the bf16 matmul rate measured on the H200)."""
    import copy

    import bench_encode

    from llm2vec_fast import LLM2Vec, patch
    from llm2vec_fast.testing import MISTRAL_7B, SMOLLM2_135M, random_model

    tokenizer = _tokenizer()
    shapes = {"smollm2-135m-shape": ("llama", SMOLLM2_135M, 2000), "mistral-7b-shape": ("mistral", MISTRAL_7B, 600)}
    if ctx.smoke:
        shapes = {"tiny-llama": ("llama", dict(num_hidden_layers=2), 24)}
    summary = {}
    for label, (family, shape, n_texts) in shapes.items():
        texts = _synthetic_texts(n_texts)
        # Built directly in the benchmark dtype: a 7B model is never materialised in fp32 (28 GB, minutes).
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        model = random_model(family, len(tokenizer), spread=None, device=ctx.device, dtype=dtype, **shape)
        small = sum(p.numel() for p in model.parameters()) < 1e9

        def make_encoder(want, model=model, small=small):
            if want == model.dtype:
                return LLM2Vec(patch(model), tokenizer)
            if not small:
                raise RuntimeError("the 7B shape runs in its own dtype only")
            return LLM2Vec(patch(copy.deepcopy(model).to(want)), tokenizer)

        rows = LLM2Vec(patch(model), tokenizer).tokenize_inputs(texts)
        per_token = bench_encode.flops_per_token(model, sum(len(r) ** 2 for r in rows) / sum(len(r) for r in rows))
        name = str(dtype).split(".")[1]
        bench_encode.compare(ctx.bench, make_encoder, texts, (name,), ctx.device, label=label,
                             flops_per_token=per_token, peak_flops=790e12 if ctx.device.type == "cuda" else None,
                             fp32_truth=small)
        ours = ctx.bench.rows[-1]
        ctx.check(f"encode {label} {name} agrees with the reference algorithm", ours["correct"], note=ours["note"])
        summary[label] = dict(tokens_per_s=ours["rate"], ratio_vs_reference=ours["ratio"], note=ours["note"])
        del model, make_encoder
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return summary


def train_section(ctx):
    """(a) MNTP step, full-vocabulary logits vs gathered rows + fused CE, on a Mistral-7B-wide decoder (4 of its
    32 layers, to fit the time budget) with a 128k vocabulary and 16k tokens per batch; (b) SimCSE step, two
    forwards vs one packed forward, on the SmolLM2-135M shape. bf16 weights, LoRA, gradient checkpointing."""
    import bench_train

    from llm2vec_fast import LLM2Vec, patch
    from llm2vec_fast.testing import MISTRAL_7B, SMOLLM2_135M, random_model

    tokenizer = _tokenizer()
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    if ctx.smoke:
        wide, vocab, blocks, block_size, small, batch = dict(num_hidden_layers=2), len(tokenizer), 2, 32, {}, 8
    else:
        wide, vocab, blocks, block_size = dict(MISTRAL_7B, num_hidden_layers=4), 128256, 32, 512
        small, batch = SMOLLM2_135M, 128
    causal_lm = random_model("mistral", vocab, spread=None, causal_lm=True, dtype=dtype, device=ctx.device, **wide)
    patch(causal_lm)
    texts = _synthetic_texts(blocks * block_size // 8 + 50)
    prepared = bench_train.prepare_mntp(causal_lm, tokenizer, blocks, block_size, ctx.device, texts=texts)
    sides = {side: bench_train.mntp_side(side, lambda: prepared, ctx.device) for side in ("reference", "ours")}
    bench_train.add_mntp_rows(ctx.bench, sides, f"mistral-7b-wide-{wide['num_hidden_layers']}L-V{vocab}")
    mntp = [r for r in ctx.bench.rows if r["op"] == "mntp_step"][-2:]
    ctx.check("mntp fused loss equals full-logits loss", all(r["correct"] for r in mntp))
    del causal_lm, prepared
    encoder = LLM2Vec(patch(random_model("llama", len(tokenizer), spread=None, dtype=dtype, device=ctx.device,
                                         attention_dropout=0.3, **small)), tokenizer, max_length=128)
    stage = bench_train.simcse_stage_for(encoder, _synthetic_texts(batch * 4), batch, ctx.device,
                                         str(dtype).split(".")[1])
    bench_train.add_simcse_rows(ctx.bench, stage, "smollm2-135m-shape")
    simcse = [r for r in ctx.bench.rows if r["op"] == "simcse_step"][-2:]
    # CPU runs measure no peak memory (0 MiB).
    peak_ratio = mntp[1]["peak_mib"] / mntp[0]["peak_mib"] if mntp[0]["peak_mib"] else None
    return dict(mntp_peak_memory_ratio=peak_ratio, mntp_step_time_ratio=mntp[1]["ratio"],
                simcse_speedup=simcse[1]["ratio"])


# Sections run in this order (most valuable first): name -> function(ctx) -> summary dict.
SECTIONS = {
    "attention": attention_section,
    "dropout": dropout_section,
    "pooling": pooling_section,
    "attention_fp32": attention_fp32_section,
    "kernel_bench": kernel_bench_section,
    "attention_sweep": attention_sweep_section,
    "encode": encode_section,
    "train": train_section,
}
# Names that stand for several sections on the command line.
GROUPS = {"kernels": ("attention", "dropout", "pooling", "attention_fp32", "kernel_bench", "attention_sweep")}
# Estimated seconds per section on an H200, Triton compile time included: no lease has timed them yet (the
# results file records each section's real seconds; update these from it). Used by --dry-run.
ESTIMATED_SECONDS = {"attention": 60, "dropout": 15, "pooling": 10, "attention_fp32": 20, "kernel_bench": 120,
                     "attention_sweep": 45, "encode": 120, "train": 90}
DEFAULT_BUDGET_S = 480.0


def parse_sections(text):
    """'kernels,encode' -> ('attention', ..., 'encode') in SECTIONS order; unknown names raise ValueError."""
    names = [n for part in text.split(",") if part for n in GROUPS.get(part, (part,))]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)} or {list(GROUPS)}")
    return tuple(n for n in SECTIONS if n in names)


def run_section(ctx, name):
    """Run one section; whatever it raises is recorded (status, traceback) and does not stop the run."""
    state = ctx.sections[name]
    state["status"], ctx.current, t = "running", name, time.time()
    ctx.save()
    try:
        state["summary"] = SECTIONS[name](ctx) or {}
        state["status"] = "ok"
    except SectionSkipped as exc:
        state["status"], state["error"] = "skipped", str(exc)
    except Exception:
        state["status"], state["error"] = "failed", traceback.format_exc()
        print(state["error"], file=sys.stderr, flush=True)
    state["seconds"] = time.time() - t
    ctx.current = None
    ctx.log("section", dict(section=name, **state))
    ctx.save()
    print(f"# section {name}: {state['status']}, {state['seconds']:.1f} s", flush=True)


def dry_run(sections, budget_s):
    """The plan: each section in order with its estimated seconds, and where the budget would cut it."""
    total = 0.0
    print(f"{'section':<16} {'est. s':>7} {'cumulative':>10}")
    for name in sections:
        fits = budget_s is None or total < budget_s  # a section starts while the budget is not yet spent
        total += ESTIMATED_SECONDS[name]
        doc = " ".join((SECTIONS[name].__doc__ or "").split()).split(". ")[0].split(": ")[0][:90]
        print(f"{name:<16} {ESTIMATED_SECONDS[name]:>7.0f} {total:>10.0f}  {'' if fits else '(skipped: budget) '}"
              f"{doc}")
    print(f"# estimated {total:.0f} s for {len(sections)} sections; budget "
          f"{'none' if budget_s is None else f'{budget_s:.0f} s'}")
    return 0


def main(sections=tuple(SECTIONS), out=None, cpu_smoke=False, budget_s=DEFAULT_BUDGET_S):
    if not torch.cuda.is_available() and not cpu_smoke:
        print("no GPU: run with --cpu-smoke to exercise the script on the CPU", file=sys.stderr)
        return 2
    ctx = Context("cuda" if torch.cuda.is_available() and not cpu_smoke else "cpu", cpu_smoke, out, budget_s)
    print(f"# gpu_check on {ctx.bench.device_name}, torch {torch.__version__}, commit {ctx.bench.commit}", flush=True)
    ctx.sections = {name: dict(status="pending", seconds=None, summary=None, error=None) for name in sections}
    ctx.save()
    for name in sections:
        spent = time.time() - ctx.t0
        if budget_s is not None and spent >= budget_s:
            ctx.sections[name].update(status="skipped", error=f"budget of {budget_s:.0f} s spent ({spent:.0f} s)")
            ctx.save()
            print(f"# section {name}: skipped, budget spent", flush=True)
            continue
        run_section(ctx, name)
    ctx.bench.print_table()
    failed = ctx.failed()
    if out:
        print(f"# wrote {out}")
    print(f"# {len(ctx.checks)} checks, {len(failed)} failed, {time.time() - ctx.t0:.1f} s; sections: "
          + ", ".join(f"{n} {s['status']}" for n, s in ctx.sections.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="results JSON path (e.g. $OUT/gpu_check.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, from {list(SECTIONS)} or {list(GROUPS)}")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock seconds; sections not started when it is spent are skipped (0: no budget)")
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU through the interpreter")
    parser.add_argument("--dry-run", action="store_true", help="print the plan with estimated seconds; run nothing")
    args = parser.parse_args()
    try:
        chosen = parse_sections(args.sections)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        sys.exit(dry_run(chosen, args.budget_s or None))
    sys.exit(main(chosen, args.out, args.cpu_smoke, args.budget_s or None))
