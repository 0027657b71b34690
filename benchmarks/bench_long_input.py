"""Memory and time of embedding one very long document whole (long_input="chunk"), on a tiny random model.

    python benchmarks/bench_long_input.py [--tokens 1000000] [--max-length 512] [--max-batch-tokens 4096]
                                          [--no-check] [--out benchmarks/results/long_input_cpu.json]

What it shows: a document of `--tokens` tokens is tokenized once, and its windows (max_length tokens each) are
encoded in token-budget batches, so the memory an encode adds on top of the token ids is one batch of activations
and one running sum, whatever the document's length. The RSS is read (Linux /proc, and the peak from getrusage)
after loading the model, after tokenizing and after encoding; "all hidden states" is what keeping the last layer's
states of every token would take alone (tokens x hidden x 4 bytes), for scale. With the check on (the default),
the embedding must equal the token-weighted mean of its windows encoded as ordinary rows (max |diff| <= 1e-5),
else no time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_name, git_commit  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.chunking import split_windows, window_row  # noqa: E402
from llm2vec_fast.testing import build_model_dir, corpus  # noqa: E402

MB = 1 << 20


def rss() -> int:
    """This process's resident set size now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def document(tokens: int, tokenizer) -> str:
    """Synthetic text of about `tokens` tokens (whole sentences of testing.corpus, repeated)."""
    sample = " ".join(corpus(200, seed=3))
    per_copy = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    return " ".join([sample] * max(1, -(-tokens // per_copy)))


def run(tokens: int = 1_000_000, max_length: int = 512, max_batch_tokens: int = 4096, check: bool = True,
        out: str | None = None) -> dict:
    directory = build_model_dir(os.path.join(tempfile.mkdtemp(), "llama"), "llama")
    model = LLM2Vec.from_pretrained(directory, dtype=torch.float32, max_length=max_length, long_input="chunk")
    model.encode(["warm-up"], show_progress_bar=False)  # native ops and prepared GEMMs, outside the measurement
    text = document(tokens, model.tokenizer)
    loaded = rss()

    started = time.perf_counter()
    rows = model.tokenize_inputs([text])
    tokenize_seconds = time.perf_counter() - started
    tokenized, peak_tokenize = rss(), peak_rss()

    started = time.perf_counter()
    embedding = model.encode_rows(rows, max_batch_tokens=max_batch_tokens)[0]
    encode_seconds = time.perf_counter() - started
    encoded, peak_encode = rss(), peak_rss()

    n = len(rows[0])
    windows = split_windows(rows, max_length, 0)
    difference = None
    if check:
        window_rows = [window_row(rows[0], w) for w in windows]
        vectors = model.encode_rows(window_rows, max_batch_tokens=max_batch_tokens, long_input="truncate").double()
        weights = torch.tensor([float(w.end - w.start) for w in windows], dtype=torch.float64)
        expected = (vectors * weights[:, None]).sum(0) / weights.sum()
        difference = float((embedding.double() - expected).abs().max())
    ok = difference is None or difference <= 1e-5
    result = dict(device=device_name("cpu"), commit=git_commit(), tokens=n, windows=len(windows),
                  max_length=max_length, max_batch_tokens=max_batch_tokens, hidden=model.config.hidden_size,
                  threads=torch.get_num_threads(), tokenize_s=round(tokenize_seconds, 2),
                  encode_s=round(encode_seconds, 2) if ok else None,
                  tokens_per_s=round(n / encode_seconds) if ok else None,
                  rss_loaded_mb=round(loaded / MB), rss_tokenized_mb=round(tokenized / MB),
                  rss_encoded_mb=round(encoded / MB), peak_tokenize_mb=round(peak_tokenize / MB),
                  peak_encode_mb=round(peak_encode / MB),
                  encode_added_peak_mb=round((peak_encode - max(peak_tokenize, tokenized)) / MB),
                  all_hidden_states_mb=round(n * model.config.hidden_size * 4 / MB),
                  max_abs_difference_to_windows=difference)
    print(json.dumps(result, indent=2))
    if not ok:
        print(f"check failed: the embedding differs from the windows' weighted mean by {difference:.3g}",
              file=sys.stderr)
    if out:
        with open(out, "w") as f:
            json.dump([result], f, indent=2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000, help="the document's length in tokens (about)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per window")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="tokens per encode batch")
    parser.add_argument("--no-check", action="store_true", help="skip the weighted-mean check (halves the time)")
    parser.add_argument("--out", default=None, help="write the result row to this JSON file")
    args = parser.parse_args()
    result = run(args.tokens, args.max_length, args.max_batch_tokens, not args.no_check, args.out)
    return 0 if result["encode_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
