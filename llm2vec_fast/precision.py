"""The dtype policy of an encode: what `dtype="auto"` / `"mixed"` mean, and the token budget each precision uses.

One owner for these decisions, read by `LLM2Vec.from_pretrained`, the encode job, the CLI and the Ray predictor.
float32 is the default everywhere; "mixed" (float32 weights, bf16 CPU matmuls) and bfloat16 are opt-in, and
"auto" is the opt-in that lets a measurement on this machine pick (`cpu_linear.choose_cpu_dtype`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .choices import DEFAULT_MAX_BATCH_TOKENS

# Why DEFAULT_MAX_BATCH_TOKENS (llm2vec_fast/choices.py) holds these budgets. CPU: the measured best of 512-8192 on SmolLM2-135M with 2 threads (benchmarks/bench_budget.py): 1024 for fp32
# GEMMs, 4096 where the GEMMs run in bf16 (bf16 or the mixed mode: larger AMX GEMMs and fewer per-batch passes;
# 1024 was 10-26% slower there in the passes measured). CUDA: a budget that fills an H200 with a 135M-7B model.


def default_max_batch_tokens(device_type: str, matmul_dtype: Optional[torch.dtype] = None) -> int:
    """The default token budget for an encode on `device_type` ("cpu", "cuda", ...) whose GEMMs run in
    matmul_dtype (on CPU, bfloat16 takes the larger budget; anything else, None included, the fp32 one)."""
    if device_type == "cpu" and matmul_dtype == torch.bfloat16:
        return DEFAULT_MAX_BATCH_TOKENS["cpu-bf16"]
    return DEFAULT_MAX_BATCH_TOKENS.get(device_type, DEFAULT_MAX_BATCH_TOKENS["cpu"])


def resolve_auto_dtype(config, device=None, max_batch_tokens: Optional[int] = None) -> str:
    """What dtype="auto" means for a model with this `config` encoding on `device` (default: cuda if available):
    on CPU the measured choice of `cpu_linear.choose_cpu_dtype` ("mixed" or "float32", announced once on
    stderr); on a GPU "auto", Hugging Face's meaning (the checkpoint's dtype)."""
    device = torch.device(device) if device is not None else None
    if (device is None and torch.cuda.is_available()) or (device is not None and device.type != "cpu"):
        return "auto"
    from .cpu_linear import announce_cpu_dtype, choose_cpu_dtype

    tokens = max_batch_tokens or default_max_batch_tokens("cpu", torch.bfloat16)  # the budget mixed would use
    choice, reason = choose_cpu_dtype(config.hidden_size, getattr(config, "intermediate_size", 4 * config.hidden_size),
                                      tokens)
    announce_cpu_dtype(choice, reason)
    return choice


def resolve_dtype_argument(kwargs: dict, runtime_args: dict, config) -> tuple[dict, dict]:
    """Turn from_pretrained's dtype="mixed" / "auto" (CPU) into a Hugging Face dtype plus our matmul_dtype."""
    name = "dtype" if "dtype" in kwargs else "torch_dtype"
    dtype = kwargs.get(name)
    if not isinstance(dtype, str) or dtype not in ("auto", "mixed"):
        return kwargs, runtime_args
    if dtype == "auto":
        dtype = resolve_auto_dtype(config, max_batch_tokens=runtime_args.get("max_batch_tokens"))
        if dtype == "auto":
            return kwargs, runtime_args
    if runtime_args.get("matmul_dtype") is not None and dtype == "mixed" \
            and runtime_args["matmul_dtype"] != torch.bfloat16:
        raise ValueError(f"dtype='mixed' means matmul_dtype=torch.bfloat16, got matmul_dtype="
                         f"{runtime_args['matmul_dtype']!r}; pass one of the two.")
    kwargs = dict(kwargs)
    kwargs[name] = torch.float32 if dtype in ("mixed", "float32") else getattr(torch, dtype)
    if dtype == "mixed":
        runtime_args = {**runtime_args, "matmul_dtype": torch.bfloat16}
    return kwargs, runtime_args
