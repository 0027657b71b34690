"""`make demo`: encode a few sentences and instruction/text pairs with the embedded SmolLM2-135M.

Prints the embedding shape, a cosine-similarity table in which each sentence's paraphrase should be its nearest
neighbour, a small retrieval example with an instruction on the query side, and the encode throughput.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import LLM2Vec

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs a song with a guitar.",
    "The stock market fell sharply today.",
    "Share prices dropped on Wall Street this afternoon.",
    "A cat is sleeping on the sofa.",
    "The kitten naps on the couch.",
]
QUERY_INSTRUCTION = "Given a question, retrieve the passage that answers it:"
QUERIES = ["How do plants make their food?", "What is the capital of France?"]
PASSAGES = [
    "Paris is the capital and largest city of France.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "The Pacific is the largest ocean on Earth.",
]


def precision_label(model: LLM2Vec) -> str:
    """"float32", "bfloat16" or "mixed (bf16 matmuls)": what a CPU encode of `model` runs in."""
    if model.matmul_dtype is not None and model.matmul_dtype != model.dtype:
        return "mixed (bf16 matmuls, fp32 residual stream)"
    return str(model.dtype).replace("torch.", "")


def main(argv=None) -> int:
    """Run the demo and return 0; argv: its arguments (default: sys.argv[1:]).

    Loads --model and prints the cosine similarities of sample sentences (paraphrase pairs among unrelated
    ones), a small retrieval with an instruction on the query side and the encode throughput.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model directory or the embedded default's name")
    # float32 by default, as the API and the CLI: faster modes change the embeddings, so they are opt-in.
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "mixed"],
                        help="float32 (default); mixed: bf16 matmuls, fp32 residual stream; auto: mixed where "
                             "measured faster on this CPU")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    started = time.perf_counter()
    dtype = args.dtype if args.dtype in ("auto", "mixed") else getattr(torch, args.dtype)
    model = LLM2Vec.from_pretrained(args.model, dtype=dtype)
    print(f"loaded {args.model} ({model.config.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {precision_label(model)}, bidirectional, mean pooling) in "
          f"{time.perf_counter() - started:.1f} s")

    embeddings = model.encode(SENTENCES, show_progress_bar=False)
    print(f"\nembeddings: {tuple(embeddings.shape)} {embeddings.dtype}")
    similarity = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = similarity @ similarity.T
    print("\ncosine similarity (rows and columns: the sentences below; * marks each row's nearest neighbour)")
    print("     " + "".join(f"{j:>8d}" for j in range(len(SENTENCES))))
    for i, sentence in enumerate(SENTENCES):
        others = similarity[i].clone()
        others[i] = -2
        nearest = int(others.argmax())
        cells = "".join(f"{similarity[i, j]:7.3f}{'*' if j == nearest else ' '}" for j in range(len(SENTENCES)))
        print(f"{i:>3d}  {cells}  {sentence}")
    # Sentences 2k and 2k+1 are paraphrases of each other; every other pair is unrelated.
    n = len(SENTENCES)
    partner = torch.arange(n) ^ 1
    unrelated_mask = ~torch.eye(n, dtype=torch.bool)
    unrelated_mask[torch.arange(n), partner] = False
    related = similarity[torch.arange(n), partner]
    unrelated = similarity[unrelated_mask]
    closer = int((related > similarity.masked_fill(~unrelated_mask, -2).max(dim=1).values).sum())
    print(f"mean cosine of related pairs {related.mean():.3f} > unrelated pairs {unrelated.mean():.3f}; the paraphrase "
          f"is closer than every unrelated sentence for {closer}/{n} sentences")
    print("(an untrained bidirectional conversion is LLM2Vec's step 1: MNTP and SimCSE training sharpen it)")

    queries = model.encode([[QUERY_INSTRUCTION, q] for q in QUERIES], show_progress_bar=False,
                           normalize_embeddings=True)
    passages = model.encode(PASSAGES, show_progress_bar=False, normalize_embeddings=True)
    print("\nretrieval with an instruction on the query side:")
    for query, scores in zip(QUERIES, queries @ passages.T):
        best = int(scores.argmax())
        print(f"  {query!r} -> {PASSAGES[best]!r} (cosine {scores[best]:.3f})")

    texts = [s for s in SENTENCES + PASSAGES + QUERIES] * 16
    rows = model.tokenize_inputs(texts)
    tokens = sum(len(r) for r in rows)
    started = time.perf_counter()
    model.encode_rows(rows)
    elapsed = time.perf_counter() - started
    print(f"\nthroughput: {len(texts)} texts, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:,.0f} tokens/s "
          f"({torch.get_num_threads()} CPU threads)" if not torch.cuda.is_available() else
          f"\nthroughput: {len(texts)} texts, {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
