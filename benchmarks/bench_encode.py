"""Encode throughput: the llm2vec reference's algorithm vs our padding-free engine, same model, same texts.

    python benchmarks/bench_encode.py [--dtypes float32 bfloat16] [--sentences 300] [--paragraphs 20]
                                      [--out benchmarks/results/encode_cpu.json]

Texts: Wikipedia sentences plus longer news paragraphs (gensim's test data). Both sides run in this process on
the same LLM2Vec-converted model (the embedded SmolLM2-135M by default); the reference side is a faithful
re-implementation of llm2vec 0.2.3's encode (benchmarks/reference_encode.py). Embeddings of the two sides are
compared before any speed is reported. Prints tokens/s for both and the ratio, per dtype.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402
from reference_encode import reference_encode  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.offline_data import lee_background_documents, wikipedia_sentences  # noqa: E402


def benchmark_texts(n_sentences: int, n_paragraphs: int) -> list[str]:
    sentences = wikipedia_sentences()
    step = max(1, len(sentences) // max(n_sentences, 1))
    return list(sentences[::step][:n_sentences]) + list(lee_background_documents()[:n_paragraphs])


def run(model_name="smollm2-135m", dtypes=("float32", "bfloat16"), n_sentences=300, n_paragraphs=20, device=None,
        max_batch_tokens=None, out=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = Bench(device, warmup=0, repeats=1)
    compare(bench, lambda dtype: LLM2Vec.from_pretrained(model_name, dtype=dtype), benchmark_texts(n_sentences,
            n_paragraphs), dtypes, device, max_batch_tokens)
    bench.print_table()
    if out:
        bench.save(out, extra=dict(model=model_name, threads=torch.get_num_threads(),
                                   time=time.strftime("%Y-%m-%d %H:%M:%S")))
    return bench


def compare(bench, make_encoder, texts, dtypes, device, max_batch_tokens=None, label="", flops_per_token=None,
            peak_flops=None, fp32_truth=True):
    """Time the reference algorithm and our engine on `texts` for each dtype; make_encoder(torch dtype) -> LLM2Vec.
    With flops_per_token and peak_flops, our rows also carry the model FLOP utilisation (MFU). Lower precisions
    are checked against our fp32 embeddings, or with ``fp32_truth=False`` (a 7B model, where an fp32 copy costs
    28 GB and minutes) against the reference algorithm's embeddings in the same dtype."""
    truth = None  # float32 embeddings of our engine, the yardstick for lower precisions
    for dtype_name in dtypes:
        encoder = make_encoder(getattr(torch, dtype_name)).to(device)
        tokens = sum(len(r) for r in encoder.tokenize_inputs(texts))
        shape = dict(model=label, texts=len(texts), tokens=tokens, dtype=dtype_name) if label else \
            dict(texts=len(texts), tokens=tokens, dtype=dtype_name)
        if dtype_name != "float32" and truth is None and fp32_truth:
            truth = make_encoder(torch.float32).to(device).encode(texts, show_progress_bar=False, device=device)
        # Warm both paths (allocator, kernels' first launch) on a few texts.
        reference_encode(encoder, texts[:8], device=device)
        encoder.encode(texts[:8], show_progress_bar=False, device=device)
        results = {}

        def ours():
            results["ours"] = encoder.encode(texts, show_progress_bar=False, device=device,
                                             max_batch_tokens=max_batch_tokens)

        def reference():
            results["reference"] = reference_encode(encoder, texts, device=device)

        bench.run("encode", "llm2vec-0.2.3-algo", shape, reference, tokens=tokens, baseline=True)
        bench.run("encode", "llm2vec-fast", shape, ours, tokens=tokens, ours=True)
        ok, message = _agree(results, truth if dtype_name != "float32" else None, dtype_name != "float32")
        row = bench.rows[-1]
        row["correct"], row["note"] = ok, message if ok else f"CORRECTNESS FAILED {message}"
        if not ok:
            row["ms"] = row["rate"] = row["ratio"] = None  # no speed for an engine that is not right
        elif flops_per_token and peak_flops and row["rate"]:
            row["note"] += f"; MFU {row['rate'] * flops_per_token / peak_flops:.1%}"
        if dtype_name == "float32":
            truth = results["ours"]
        del encoder
    return bench


def flops_per_token(model, mean_length: float) -> float:
    """Forward FLOPs per token: 2 x the decoder's matmul weights + attention's 4 x layers x heads x head_dim x L."""
    config = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * linear + 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * mean_length


def _agree(results, truth, low_precision=False):
    """float32: ours must match the reference algorithm (rotary is relative, so only rounding differs).
    Lower precision: our error against float32 must be at most twice the reference algorithm's (the project's
    tolerance rule), both measured as 1 - cosine to the float32 embeddings."""
    cosine = torch.nn.functional.cosine_similarity
    ours, reference = results["ours"], results["reference"]
    if truth is None and not low_precision:
        worst = cosine(reference, ours, dim=-1).min()
        return bool(worst > 0.9999), f"min cosine(reference, ours) {worst:.6f}"
    if truth is None:
        # No fp32 truth (a 7B model): two bf16 computations in different orders; bf16 rounding alone moves an
        # embedding by 1 - cosine ~ 1e-2 on real models, so this only catches a wrong result, not a worse one.
        sims = cosine(reference.float(), ours.float(), dim=-1)
        return bool(sims.mean() > 0.99 and sims.min() > 0.95), \
            f"cosine(reference, ours) mean {sims.mean():.5f} min {sims.min():.5f} (no fp32 truth)"
    ours_error = (1 - cosine(ours, truth, dim=-1)).max()
    reference_error = (1 - cosine(reference, truth, dim=-1)).max()
    return bool(ours_error <= 2 * reference_error + 1e-6), \
        f"max 1-cosine to float32: ours {ours_error:.2e}, reference {reference_error:.2e}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--paragraphs", type=int, default=20)
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bench = run(args.model, args.dtypes, args.sentences, args.paragraphs, args.device, args.max_batch_tokens, args.out)
    return 1 if bench.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
