"""Training-step benchmarks, both sides on the same batch in one run of this script.

    python benchmarks/bench_train.py [--model smollm2-135m] [--dtype float32] [--mntp-blocks 4 --block-size 256]
                                     [--simcse-batch 32] [--out benchmarks/results/train_cpu.json]

(a) MNTP step: the reference's full-vocabulary logits + shifted cross entropy vs our gathered rows + chunked fused
    linear cross-entropy. Peak memory (GPU: max allocated; CPU: each side in a fresh process, peak RSS growth
    during the step) and step time. Losses must agree before times are reported.
(b) SimCSE step: the reference's two forwards (one per dropout view) vs our single packed forward of both views.
    Steps/s; both with the same LoRA model, batch and dropout settings.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mntp_setup(model_name, dtype, blocks, block_size, device):
    from llm2vec_fast.offline_data import wikipedia_sentences
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.mntp import MaskingCollator, make_blocks
    from llm2vec_fast.train.model import add_lora, load_causal_lm

    config = TrainConfig.for_stage("mntp", model=model_name, data="-", output="-", dtype=dtype,
                                   gradient_checkpointing=True)
    torch.manual_seed(0)
    causal_lm, tokenizer, _ = load_causal_lm(config)
    causal_lm.to(device)
    decoder = add_lora(causal_lm.get_decoder(), config)
    decoder.train()
    weight = causal_lm.get_output_embeddings().weight.detach()
    token_blocks = make_blocks(tokenizer, list(wikipedia_sentences()[:2000]), block_size)[:blocks]
    batch = MaskingCollator(tokenizer)(token_blocks, [torch.Generator().manual_seed(i) for i in range(blocks)])
    return decoder, weight, batch.to(device)


def mntp_side(side, model_name, dtype, blocks, block_size, device, repeats=3):
    """One side of (a): returns dict(loss, ms, peak_mib)."""
    from llm2vec_fast.train.mntp import mntp_loss, reference_mntp_loss

    decoder, weight, batch = _mntp_setup(model_name, dtype, blocks, block_size, device)
    fn = mntp_loss if side == "ours" else reference_mntp_loss

    def step():
        decoder.zero_grad(set_to_none=True)
        loss = fn(decoder, weight, batch)
        loss.backward()
        return float(loss)

    loss = step()  # warm-up
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mib()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return dict(loss=loss, ms=sorted(times)[len(times) // 2], peak_mib=peak, tokens=batch.num_tokens,
                scored=int(batch.targets.numel()))


def _in_fresh_process(fn, *args):
    # Peak RSS is a per-process high-water mark: each CPU side gets a process of its own.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def simcse_setup(model_name, dtype, batch_size, device):
    from llm2vec_fast.offline_data import wikipedia_sentences
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.simcse import SimCSEStage

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "llm2vec_fast_bench_simcse.txt")
    with open(path, "w") as f:
        f.write("\n".join(wikipedia_sentences()[:batch_size * 4]) + "\n")
    config = TrainConfig.for_stage("simcse", model=model_name, data=path, output="-", dtype=dtype,
                                   batch_size=batch_size, device=str(device), gradient_checkpointing=True)
    stage = SimCSEStage(config)
    stage.model.train()
    return stage


def simcse_two_forwards(stage, step):
    """The reference's SimCSE step: each view embedded by its own forward pass, then the same loss."""
    from llm2vec_fast.train.contrastive import info_nce

    rows = [stage.rows[i] for i in stage.batch_for_step(step)]
    encoder = stage.encoder
    first = encoder.embed_batch(encoder.make_batch(rows).to(stage.device))
    second = encoder.embed_batch(encoder.make_batch(rows).to(stage.device))
    loss = info_nce(first, second, stage.config.scale)
    loss.backward()
    return float(loss)


def run(model_name, dtype, blocks, block_size, simcse_batch, device, out):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = Bench(device, warmup=1, repeats=3)
    # (a) MNTP
    sides = {}
    for side in ("reference", "ours"):
        args = (side, model_name, dtype, blocks, block_size, str(device))
        sides[side] = mntp_side(*args) if device.type == "cuda" else _in_fresh_process(mntp_side, *args)
    ref, ours = sides["reference"], sides["ours"]
    agree = abs(ref["loss"] - ours["loss"]) <= 1e-3 * max(1.0, abs(ref["loss"]))
    shape = dict(blocks=blocks, block_size=block_size, tokens=ours["tokens"], scored=ours["scored"], dtype=dtype)
    for side, result in sides.items():
        bench.rows.append(dict(device=bench.device_name, commit=bench.commit, op="mntp_step",
                               backend="full-logits (reference)" if side == "reference" else "gathered+fused-CE",
                               shape=shape, ms=result["ms"], rate=result["tokens"] / result["ms"] * 1e3,
                               unit="tokens/s", ratio=ref["ms"] / result["ms"], peak_mib=result["peak_mib"],
                               correct=agree, baseline=side == "reference",
                               note=f"loss {result['loss']:.5f}; peak memory x{result['peak_mib'] / ref['peak_mib']:.2f}"
                                    f" of reference"))
    # (b) SimCSE
    stage = simcse_setup(model_name, dtype, simcse_batch, device)
    tokens = 2 * sum(len(stage.rows[i]) for i in stage.batch_for_step(0))
    shape = dict(batch=simcse_batch, tokens=tokens, dtype=dtype)

    def ours_step():
        stage.model.zero_grad(set_to_none=True)
        stage.step(0)

    def reference_step():
        stage.model.zero_grad(set_to_none=True)
        simcse_two_forwards(stage, 0)

    bench.run("simcse_step", "two-forwards (reference)", shape, reference_step, tokens=tokens, baseline=True)
    bench.run("simcse_step", "one-packed-forward", shape, ours_step, tokens=tokens)
    bench.print_table()
    if out:
        bench.save(out, extra=dict(model=model_name, threads=torch.get_num_threads()))
    return bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mntp-blocks", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--simcse-batch", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bench = run(args.model, args.dtype, args.mntp_blocks, args.block_size, args.simcse_batch, args.device, args.out)
    return 1 if bench.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())
