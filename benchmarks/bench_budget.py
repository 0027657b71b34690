"""CPU encode throughput against the token budget (max_batch_tokens), per dtype, in one process.

    python benchmarks/bench_budget.py [--dtypes float32 bfloat16 mixed] [--budgets 512 1024 2048 4096 8192]
                                      [--rounds 3] [--out benchmarks/results/budget_cpu.json]

The evidence behind encoder.DEFAULT_MAX_BATCH_TOKENS on CPU: for each dtype one encoder (the embedded SmolLM2-135M)
encodes `bench_encode.benchmark_texts` at every budget, plus encode(batch_size=32) as reference code calls it; the
budgets alternate within a round (the machine is shared) and a budget's rate is its best round. Each row gets the
agreement of its embeddings with the default budget's: in float32 they must match to 1e-4 in cosine; in bf16
(pure or mixed) a GEMM's blocking depends on the batch's row count, so a text's embedding moves with its batch by
bf16 rounding, and the check is the issue's fidelity bound instead (mean 1 - cosine <= 0.002). A row that fails
gets no rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts  # noqa: E402
from harness import device_name, git_commit  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "mixed": "mixed"}


def run(model="smollm2-135m", dtypes=("float32", "bfloat16", "mixed"), budgets=(512, 1024, 2048, 4096, 8192),
        rounds=3, n_sentences=300, n_paragraphs=20, out=None):
    texts = benchmark_texts(n_sentences, n_paragraphs)
    rows = []
    for name in dtypes:
        encoder = LLM2Vec.from_pretrained(model, dtype=DTYPES[name])
        tokenized = encoder.tokenize_inputs(texts)
        tokens = sum(len(r) for r in tokenized)
        default = encoder.default_batch_tokens("cpu")
        sides = [(f"budget {b}", dict(max_batch_tokens=b)) for b in budgets] + [("batch_size=32", dict(batch_size=32))]
        truth = encoder.encode_rows(tokenized)  # also the warm-up: native ops, prepared GEMMs
        best, agree = {}, {}
        for label, kwargs in sides:  # warm-up of every shape, and the agreement check
            got = encoder.encode_rows(tokenized, **kwargs)
            cosine = torch.nn.functional.cosine_similarity(got, truth, dim=-1)
            agree[label] = (float(cosine.min()), float(1 - cosine.mean()))
        for _ in range(rounds):
            for label, kwargs in sides:
                started = time.perf_counter()
                encoder.encode_rows(tokenized, **kwargs)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - started)
        for label, _ in sides:
            low, mean_gap = agree[label]
            ok = low >= 1 - 1e-4 if name == "float32" else mean_gap <= 2e-3
            rows.append(dict(device=device_name("cpu"), commit=git_commit(), dtype=name, side=label,
                             default=label == f"budget {default}", tokens=tokens,
                             rate=tokens / best[label] if ok else None, min_cosine_to_default=low,
                             mean_1_minus_cosine_to_default=mean_gap,
                             note="" if ok else "EMBEDDINGS DIFFER from the default budget's"))
            rate = f"{rows[-1]['rate']:>7,.0f} tok/s" if ok else rows[-1]["note"]
            mark = "  (default)" if rows[-1]["default"] else ""
            print(f"{name:<9} {label:<14} {rate}   vs default: min cos {low:.4f}, mean 1-cos {mean_gap:.1e}{mark}",
                  flush=True)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        meta = dict(model=model, texts=len(texts), rounds=rounds, threads=torch.get_num_threads(),
                    torch=torch.__version__, load_average=os.getloadavg(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
        with open(out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--budgets", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(b < 1 for b in args.budgets):
        parser.error("--rounds and every --budgets value must be positive")
    rows = run(args.model, args.dtypes, args.budgets, args.rounds, out=args.out)
    return 1 if any(r["rate"] is None for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
