"""Where the packed CPU encode spends its time: torch.profiler over one encode, per dtype.

    python benchmarks/profile_encode_cpu.py [--dtypes float32 bfloat16 mixed] [--sentences 150] [--paragraphs 8]
                                            [--native auto|0|1] [--top 15] [--out benchmarks/results/cpu_profile.md]

Texts: `bench_encode.benchmark_texts` on the embedded SmolLM2-135M, default max_batch_tokens. The table lists the
top ops by self CPU time (share of the profiled total) and their call counts; `--native 0` profiles the plain
PyTorch path, `--native 1` the C++ ops (llm2vec_fast.native), `auto` both.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.cpu_runtime import use_native_cpu_ops  # noqa: E402


def profile_encode(encoder, texts, top):
    encoder.encode(texts[:16], show_progress_bar=False)  # warm-up: allocator, first calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        encoder.encode(texts, show_progress_bar=False)
        seconds = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [(e.key, 100.0 * e.self_cpu_time_total / total, e.self_cpu_time_total / 1e3, e.count) for e in events[:top]]
    return rows, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "mixed"])
    parser.add_argument("--sentences", type=int, default=150)
    parser.add_argument("--paragraphs", type=int, default=8)
    parser.add_argument("--native", default="auto", choices=["auto", "0", "1"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    texts = benchmark_texts(args.sentences, args.paragraphs)
    variants = {"auto": [False, True], "0": [False], "1": [True]}[args.native]
    lines = [f"# CPU encode profile ({args.model}, {len(texts)} texts, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')})", "",
             "Self CPU time per op over one `encode` (profiler on, so times are inflated; shares are what counts).",
             "Produced by `python benchmarks/profile_encode_cpu.py`.", ""]
    for dtype_name in args.dtypes:
        dtype = "mixed" if dtype_name == "mixed" else getattr(torch, dtype_name)  # mixed: fp32 model, bf16 GEMMs
        encoder = LLM2Vec.from_pretrained(args.model, dtype=dtype)
        tokens = sum(len(r) for r in encoder.tokenize_inputs(texts))
        for native in variants:
            applied = use_native_cpu_ops(encoder.model, enable=native)
            if native and not applied:
                lines += [f"## {dtype_name}, C++ ops: unavailable (see llm2vec_fast.native)", ""]
                continue
            rows, seconds = profile_encode(encoder, texts, args.top)
            label = "C++ ops (" + ", ".join(applied) + ")" if native else "PyTorch ops"
            lines += [f"## {dtype_name}, {label}: {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.0f} tok/s "
                      f"under the profiler)", "", "| op | self CPU % | self CPU ms | calls |", "| --- | ---: | ---: | ---: |"]
            lines += [f"| `{name}` | {share:.1f} | {ms:.0f} | {calls} |" for name, share, ms, calls in rows]
            lines.append("")
        use_native_cpu_ops(encoder.model, enable=False)
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
