"""Where the opt-in CPU precisions lose fidelity: mean and minimum cosine to float32, per variant, on the benchmark
texts.

    python benchmarks/bench_fidelity.py [--sentences 300] [--paragraphs 20] [--out benchmarks/results/fidelity.json]

One process, one model (the embedded SmolLM2-135M), the same texts for every variant:
- float32: the reference every other variant is compared with;
- mixed: float32 weights, every decoder GEMM in bf16 (the residual stream, norms, softmax and pooling in float32);
- mixed, attention GEMMs in float32: only the MLP's GEMMs (gate/up, down) in bf16;
- mixed, MLP GEMMs in float32: only the attention's GEMMs (q/k/v, o) in bf16 (the MLP's input is still the
  norm's bf16 output, as in mixed);
- bfloat16: weights and everything else in bf16.
The two split variants say which GEMMs the lost fidelity comes from. Fidelity only: no speed is reported here
(bench_cpu_peers.py measures the modes' speed side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts  # noqa: E402
from harness import device_name, git_commit  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.cpu_runtime import swaps  # noqa: E402

ATTENTION_GEMMS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv")
MLP_GEMMS = ("gate_proj", "up_proj", "down_proj", "gate_up")


def keep_float32(encoder, names) -> None:
    """Make the prepared GEMMs named `names` (a module's own, or the fused group it owns) run in float32."""
    for name, module in encoder.model.named_modules():
        found = swaps.state(module)
        if found is None:
            continue
        for plan_name, plan in found.plans.items():
            if (plan_name == "linear" and name.rsplit(".", 1)[-1] in names) or plan_name in names:
                plan.requested_dtype = None  # the weights' dtype: float32
                plan._source = None  # re-prepare


def embed(model_name, texts, dtype, fp32_gemms=()):
    encoder = LLM2Vec.from_pretrained(model_name, dtype=dtype)
    encoder.encode(texts[:2], show_progress_bar=False)  # the first CPU encode prepares the runtime
    if fp32_gemms:
        keep_float32(encoder, fp32_gemms)
    return encoder.encode(texts, show_progress_bar=False).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--paragraphs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    texts = benchmark_texts(args.sentences, args.paragraphs)
    truth = embed(args.model, texts, torch.float32)
    variants = {
        "mixed": ("mixed", ()),
        "mixed, attention GEMMs in float32": ("mixed", ATTENTION_GEMMS),
        "mixed, MLP GEMMs in float32": ("mixed", MLP_GEMMS),
        "bfloat16": (torch.bfloat16, ()),
    }
    rows = []
    for label, (dtype, fp32_gemms) in variants.items():
        cosines = torch.nn.functional.cosine_similarity(embed(args.model, texts, dtype, fp32_gemms), truth, dim=-1)
        rows.append({"variant": label, "mean_cosine": round(cosines.mean().item(), 6),
                     "min_cosine": round(cosines.min().item(), 6),
                     "texts_below_0.99": int((cosines < 0.99).sum())})
        print(f"{label:<36} mean {rows[-1]['mean_cosine']:.6f}  min {rows[-1]['min_cosine']:.6f}  "
              f"below 0.99: {rows[-1]['texts_below_0.99']} of {len(texts)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(torch.device("cpu")), "commit": git_commit(), "texts": len(texts),
                       "model": args.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
