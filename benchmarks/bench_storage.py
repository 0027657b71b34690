"""Storage against retrieval quality: bytes per vector and recall@10 of truncated and quantized embeddings.

    python benchmarks/bench_storage.py [--corpus 2000] [--queries 200] [--out benchmarks/results/storage.json]

One encode of a corpus and of queries (Wikipedia sentences from gensim's test data, disjoint; the embedded
SmolLM2-135M, float32, mean pooling), then for every truncate_dim x precision the exact top-10 of each query is
compared with the truth, the top-10 of the float32 full-dimension vectors by cosine similarity:
- float32: cosine of the truncated, re-normalized vectors (sentence-transformers' order: truncate, normalize);
- int8: the dot product of the int8 codes (int32 sums), both sides quantized with the same ranges, calibrated on the
  corpus as `llm2vec-fast encode --precision int8` does (its first --calibration-rows rows: here the whole corpus);
- int8-dequantized: the same codes, ranked by the cosine of their dequantized values (what a float rescoring of
  int8 candidates, or an index that dequantizes, sees);
- binary: the Hamming distance between the packed sign bits, as FAISS' IndexBinaryFlat ranks them (ties by row).
recall@10 = |top-10 ∩ true top-10| / 10, averaged over queries. Quality only: no speed is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, git_commit  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast import quantization as q  # noqa: E402
from llm2vec_fast.offline_data import wikipedia_sentences  # noqa: E402

DIMS = (576, 256, 128, 64)
# int8-dequantized: the same int8 codes, scored by the cosine of their dequantized values (code * step + min), which
# separates the rounding's loss from that of the code dot product's metric (every dimension rescaled to 256 steps).
PRECISIONS = ("float32", "int8", "int8-dequantized", "binary")
K = 10


def texts(n_corpus: int, n_queries: int) -> tuple[list[str], list[str]]:
    """Corpus and queries: sentences spread over the whole excerpt, every other one to each side (disjoint)."""
    sentences = wikipedia_sentences()
    step = max(1, len(sentences) // (n_corpus + n_queries))
    picked = list(sentences[::step][:n_corpus + n_queries])
    return picked[:n_corpus], picked[n_corpus:]


def top_k(scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    """Row-wise indices of the k best scores, ties broken by the lower index (stable sort)."""
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")
    return order[:, :k]


def hamming(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """Hamming distances [Q, N] between packed bit rows (uint8 [*, bytes])."""
    popcount = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
    return np.stack([popcount[np.bitwise_xor(corpus, row)].sum(axis=1) for row in queries])


def search(corpus: torch.Tensor, queries: torch.Tensor, dim: int, precision: str,
           calibration: np.ndarray | None = None) -> np.ndarray:
    """Top-K corpus rows of each query for vectors truncated to `dim` (then normalized) and stored in `precision`."""
    c = q.finish(corpus, truncate_dim=dim, normalize=True)
    qv = q.finish(queries, truncate_dim=dim, normalize=True)
    if precision == "float32":
        return top_k(qv.numpy() @ c.numpy().T, K)
    if precision.startswith("int8"):
        ranges = q.calibration_ranges(c)
        codes_c = q.quantize(c.numpy(), "int8", ranges).astype(np.int32)
        codes_q = q.quantize(qv.numpy(), "int8", ranges).astype(np.int32)
        if precision == "int8":
            return top_k(codes_q @ codes_c.T, K)
        steps = np.where(ranges[1] > ranges[0], (ranges[1] - ranges[0]) / 255, 1)
        values_c, values_q = ((codes + 128) * steps + ranges[0] for codes in (codes_c, codes_q))
        values_c /= np.linalg.norm(values_c, axis=1, keepdims=True)
        values_q /= np.linalg.norm(values_q, axis=1, keepdims=True)
        return top_k(values_q @ values_c.T, K)
    bits_c = q.quantize(c.numpy(), "ubinary")  # binary's bytes + 128: the same bits
    bits_q = q.quantize(qv.numpy(), "ubinary")
    return top_k(hamming(bits_q, bits_c), K, largest=False)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found.tolist(), truth.tolist())]))


def markdown(rows: list[dict]) -> str:
    """The result rows as a markdown table."""
    lines = ["| dims | precision | bytes/vector | smaller by | recall@10 |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['truncate_dim']} | {r['precision']} | {r['bytes_per_vector']:,} | {r['compression']:.1f}x | "
              f"{r['recall_at_10']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/storage.json")
    args = parser.parse_args()

    corpus_texts, query_texts = texts(args.corpus, args.queries)
    encoder = LLM2Vec.from_pretrained(args.model, dtype=torch.float32)
    started = time.perf_counter()
    corpus = encoder.encode(corpus_texts, show_progress_bar=False)
    queries = encoder.encode(query_texts, show_progress_bar=False)
    encode_seconds = time.perf_counter() - started
    full = encoder.embedding_dim
    truth = search(corpus, queries, full, "float32")

    rows = []
    for dim in DIMS:
        if dim > full:
            continue
        for precision in PRECISIONS:
            found = search(corpus, queries, dim, precision)
            rows.append({"truncate_dim": dim, "precision": precision,
                         "bytes_per_vector": q.bytes_per_vector(dim, precision.split("-")[0]),
                         "compression": (q.bytes_per_vector(full, "float32")
                                         / q.bytes_per_vector(dim, precision.split("-")[0])),
                         "recall_at_10": round(recall(found, truth), 4)})

    print(markdown(rows))
    result = {"model": args.model, "device": device_name("cpu"), "commit": git_commit(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "corpus": len(corpus_texts), "queries": len(query_texts),
              "k": K, "truth": f"float32 {full}-dim cosine top-{K}", "encode_seconds": round(encode_seconds, 1),
              "corpus_source": "gensim test data: Wikipedia sentences (llm2vec_fast.offline_data)", "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
