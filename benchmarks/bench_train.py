"""Training-step benchmarks, both sides on the same batch in one run of this script.

    python benchmarks/bench_train.py [--model smollm2-135m] [--dtype float32] [--mntp-blocks 4 --block-size 256]
                                     [--simcse-batch 32] [--out benchmarks/results/train_cpu.json]

(a) MNTP step: the reference's full-vocabulary logits + shifted cross entropy vs our gathered rows + chunked fused
    linear cross-entropy. Peak memory (GPU: max allocated; CPU: each side in a fresh process, peak RSS growth
    during the steps, sampled) and step time. Losses must agree before times are reported.
(b) SimCSE step: the reference's two forwards (one per dropout view) vs our single packed forward of both views.
    Steps/s; both with the same LoRA model, batch and dropout settings.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Bench  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Highest resident set size while the block runs, sampled every 2 ms by a thread (the process-lifetime
    high-water mark, ru_maxrss, would include model loading)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mib(), threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, _rss_mib())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def mntp_setup(model_name, dtype, blocks, block_size, device):
    """(LoRA decoder in train mode, frozen LM head weight, one masked batch) on the embedded or a local model."""
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.model import load_causal_lm

    config = TrainConfig.for_stage("mntp", model=model_name, data="-", output="-", dtype=dtype)
    torch.manual_seed(0)
    causal_lm, tokenizer, _ = load_causal_lm(config)
    return prepare_mntp(causal_lm.to(device), tokenizer, blocks, block_size, device)


def prepare_mntp(causal_lm, tokenizer, blocks, block_size, device, texts=None):
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.mntp import MaskingCollator, make_blocks
    from llm2vec_fast.train.model import add_lora

    if texts is None:
        from llm2vec_fast.offline_data import wikipedia_sentences

        texts = list(wikipedia_sentences()[:4000])
    config = TrainConfig.for_stage("mntp", data="-", output="-", gradient_checkpointing=True)
    decoder = add_lora(causal_lm.get_decoder(), config)
    decoder.train()
    weight = causal_lm.get_output_embeddings().weight.detach()
    token_blocks = make_blocks(tokenizer, texts, block_size)[:blocks]
    if len(token_blocks) < blocks:
        raise ValueError(f"only {len(token_blocks)} blocks of {block_size} tokens in the text; need {blocks}")
    batch = MaskingCollator(tokenizer)(token_blocks, [torch.Generator().manual_seed(i) for i in range(blocks)])
    return decoder, weight, batch.to(device)


def mntp_side(side, setup, device, repeats=3):
    """One side of (a) on setup() = (decoder, weight, batch): dict(loss, ms, peak_mib, tokens, scored)."""
    from llm2vec_fast.train.mntp import mntp_loss, reference_mntp_loss

    decoder, weight, batch = setup()
    fn = mntp_loss if side == "ours" else reference_mntp_loss

    def step():
        decoder.zero_grad(set_to_none=True)
        loss = fn(decoder, weight, batch)
        loss.backward()
        return float(loss.detach())

    loss = step()  # warm-up
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    with PeakRSS() as rss:
        base_rss = _rss_mib()
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
    # GPU: the most allocated during the steps beyond what was held before; CPU: the RSS growth during the steps.
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss.peak - base_rss
    return dict(loss=loss, ms=sorted(times)[len(times) // 2], peak_mib=peak, tokens=batch.num_tokens,
                scored=int(batch.targets.numel()))


def _cpu_mntp_side(side, model_name, dtype, blocks, block_size):
    return mntp_side(side, lambda: mntp_setup(model_name, dtype, blocks, block_size, "cpu"), "cpu")


def _in_fresh_process(fn, *args):
    # Peak RSS is a per-process high-water mark: each CPU side gets a process of its own.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def add_mntp_rows(bench, sides, label=""):
    ref, ours = sides["reference"], sides["ours"]
    agree = abs(ref["loss"] - ours["loss"]) <= 1e-3 * max(1.0, abs(ref["loss"]))
    shape = dict(model=label, tokens=ours["tokens"], scored=ours["scored"])
    for side, result in sides.items():
        bench.rows.append(dict(
            device=bench.device_name, commit=bench.commit, op="mntp_step",
            backend="full-logits (reference)" if side == "reference" else "gathered+fused-CE", shape=shape,
            ms=result["ms"] if agree else None, rate=result["tokens"] / result["ms"] * 1e3 if agree else None,
            unit="tokens/s", ratio=ref["ms"] / result["ms"] if agree else None, peak_mib=result["peak_mib"],
            correct=agree, baseline=side == "reference",
            note=(f"loss {result['loss']:.5f}; step peak memory x{result['peak_mib'] / ref['peak_mib']:.2f} of "
                  f"reference") if agree else f"CORRECTNESS FAILED losses {ref['loss']} vs {ours['loss']}"))


def simcse_stage_for(encoder, texts, batch_size, device, dtype="float32"):
    """A SimCSE stage (dropout 0.3, LoRA, gradient checkpointing) on `encoder` over `texts`."""
    from llm2vec_fast.train.config import TrainConfig
    from llm2vec_fast.train.simcse import SimCSEStage

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llm2vec_fast_bench_simcse_{os.getpid()}.txt")
    with open(path, "w") as f:
        f.write("\n".join(texts) + "\n")
    config = TrainConfig.for_stage("simcse", model="-", data=path, output="-", dtype=dtype, batch_size=batch_size,
                                   device=str(device), gradient_checkpointing=True)
    stage = SimCSEStage(config, encoder=encoder)
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
    return float(loss.detach())


def add_simcse_rows(bench, stage, label=""):
    tokens = 2 * sum(len(stage.rows[i]) for i in stage.batch_for_step(0))
    shape = dict(model=label, batch=stage.config.batch_size, tokens=tokens)

    def ours_step():
        stage.model.zero_grad(set_to_none=True)
        stage.step(0)

    def reference_step():
        stage.model.zero_grad(set_to_none=True)
        simcse_two_forwards(stage, 0)

    bench.run("simcse_step", "two-forwards (reference)", shape, reference_step, tokens=tokens, baseline=True)
    bench.run("simcse_step", "one-packed-forward", shape, ours_step, tokens=tokens, ours=True)


def run(model_name, dtype, blocks, block_size, simcse_batch, device, out):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.offline_data import wikipedia_sentences

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = Bench(device, warmup=1, repeats=3)
    if device.type == "cuda":
        sides = {side: mntp_side(side, lambda: mntp_setup(model_name, dtype, blocks, block_size, device), device)
                 for side in ("reference", "ours")}
    else:
        sides = {side: _in_fresh_process(_cpu_mntp_side, side, model_name, dtype, blocks, block_size)
                 for side in ("reference", "ours")}
    add_mntp_rows(bench, sides, f"{model_name} {dtype}")
    encoder = LLM2Vec.from_pretrained(model_name, dtype=getattr(torch, dtype), attention_dropout=0.3, max_length=128)
    stage = simcse_stage_for(encoder, list(wikipedia_sentences()[:simcse_batch * 4]), simcse_batch, device, dtype)
    add_simcse_rows(bench, stage, f"{model_name} {dtype}")
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
