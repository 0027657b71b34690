"""CPU encode against the other CPU runtimes: one process, alternating sides, the same texts, model and pooling.

    python benchmarks/bench_cpu_peers.py [--sentences 300] [--paragraphs 20] [--rounds 2] [--sides ...]
                                         [--out benchmarks/results/cpu_peers.json]

Sides (each a dtype and a runtime, all on the embedded SmolLM2-135M by default, bidirectional, mean pooling over
the same tokens our tokenizer front end gives):
- llm2vec-fast in float32, bfloat16 and the mixed mode (bf16 matmuls, fp32 residual stream), and with
  encode(batch_size=32) as code written for the reference calls it;
- the llm2vec 0.2.3 algorithm (benchmarks/reference_encode.py) on a plain patched model, float32 and bfloat16;
- ONNX Runtime, float32, on the bidirectional model exported with torch.onnx (sorted, right-padded batches of 32;
  the export is cached in <cache>/bench); needs `pip install onnxruntime onnx onnxscript`;
- llama.cpp (llama-cpp-python) embeddings with causal attention off, F32 and BF16 GGUF files converted from the
  same weights with llama.cpp's convert_hf_to_gguf.py (taken from the llama-cpp-python source distribution);
- torch.compile of the plain Hugging Face model (padded batches of 32), float32 and bfloat16.
A side that cannot run here (a package that is not installed or cannot be built) gets a row that says why.

Every round times every side once, in turn, and measures the GEMM ceiling of both dtypes in between (the model's
own [1024, K] x [K, N] shapes through the faster of torch / packed oneDNN); a side's rate is its best round. Each
row has tok/s, the ratio to llm2vec-fast in the same dtype class (> 1: faster than ours), the agreement with our
float32 embeddings (mean and min cosine) and the fraction of the GEMM ceiling (ceiling tok/s = GEMM FLOP/s /
FLOPs per token). No speed is reported for a side whose float32 embeddings disagree with ours (min cosine < 0.999).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts, flops_per_token  # noqa: E402
from harness import device_name, git_commit  # noqa: E402
from reference_encode import reference_encode  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.cpu_linear import best_seconds, cpu_flags  # noqa: E402
from llm2vec_fast.default_model import cache_root  # noqa: E402

BATCH = 32  # texts per padded batch for the peers that take padded batches (what the reference uses)
SIDES = ("ours-float32", "ours-bfloat16", "ours-mixed", "ours-batch32-float32", "ours-batch32-bfloat16",
         "llm2vec-0.2.3-float32", "llm2vec-0.2.3-bfloat16",
         "onnxruntime-float32", "llama.cpp-F32", "llama.cpp-BF16", "torch.compile-float32", "torch.compile-bfloat16")
# Which dtype class a side belongs to, and the ceiling it is measured against.
CLASS = {"float32": "float32", "bfloat16": "bfloat16", "mixed": "bfloat16", "F32": "float32", "BF16": "bfloat16"}
FP32_AGREEMENT = 0.999


class Unavailable(Exception):
    """A side that cannot run on this machine; the message says why."""


# ------------------------------------------------------------------------------------------------ helpers


def padded_batches(rows, ranges, pad_id):
    """Rows sorted by length (longest first) in right-padded batches of BATCH: (indices, ids, mask, ranges)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), BATCH):
        indices = order[start:start + BATCH]
        width = max(len(rows[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for b, i in enumerate(indices):
            ids[b, :len(rows[i])] = torch.tensor(rows[i].input_ids)
            mask[b, :len(rows[i])] = 1
        yield indices, ids, mask, [ranges[i] for i in indices]


def mean_pool(hidden, batch_ranges):
    """Mean of hidden[b, start:end] per row: [B, S, H] -> [B, H] float32."""
    return torch.stack([hidden[b, s:e].float().mean(0) for b, (s, e) in enumerate(batch_ranges)])


class PaddedModel(torch.nn.Module):
    """The patched HF model on right-padded batches: a 4-D bidirectional mask and per-row positions, as our
    padded engine builds them; returns the last hidden states [B, S, H]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        valid = attention_mask.bool()
        mask = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=False).last_hidden_state


def gemm_ceiling(model, dtype, tokens=1024):
    """GFLOP/s of the model's linear shapes ([tokens, K] x [K, N], one decoder layer's set, FLOP-weighted) through
    the faster backend here; what a perfect encode would run its matmuls at."""
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    shapes = [(m.in_features, m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    flops = sum(2 * tokens * k * n for k, n in shapes)
    from llm2vec_fast import cpu_linear

    for key in [k for k in list(cpu_linear._timings) if k[2] == dtype]:  # measured now, not when first cached
        del cpu_linear._timings[key]
    seconds = sum(best_seconds(k, n, dtype, tokens) for k, n in shapes)
    return flops / seconds / 1e9


# -------------------------------------------------------------------------------------------------- sides


def side_ours(model_name, mode, texts, batch_size=None):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "mixed": "mixed"}[mode]
    encoder = LLM2Vec.from_pretrained(model_name, dtype=dtype)
    encoder.encode(texts[:16], show_progress_bar=False)  # native ops, prepared GEMMs, first calls
    return lambda: encoder.encode(texts, show_progress_bar=False, batch_size=batch_size)


def side_reference(model_name, dtype, texts):
    encoder = LLM2Vec.from_pretrained(model_name, dtype=getattr(torch, dtype))  # never encoded: plain HF modules
    reference_encode(encoder, texts[:8])
    return lambda: reference_encode(encoder, texts)


def side_compile(model_name, dtype, rows, ranges):
    encoder = LLM2Vec.from_pretrained(model_name, dtype=getattr(torch, dtype))
    compiled = torch.compile(PaddedModel(encoder.model).eval(), dynamic=True)
    pad_id = encoder.tokenizer.pad_token_id

    def run():
        out = torch.empty(len(rows), encoder.config.hidden_size)
        with torch.no_grad():
            for indices, ids, mask, batch_ranges in padded_batches(rows, ranges, pad_id):
                out[torch.tensor(indices)] = mean_pool(compiled(ids, mask), batch_ranges)
        return out

    started = time.perf_counter()
    run()  # compiles (dynamic shapes: once, plus specialisations); not timed
    print(f"  torch.compile {dtype}: compiled in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return run


def _onnx_file(model_name, encoder):
    directory = os.path.join(cache_root(), "bench", "onnx")
    path = os.path.join(directory, f"{os.path.basename(str(model_name)).replace(os.sep, '_')}-float32-"
                                   f"torch{torch.__version__.replace('+', '_')}.onnx")
    done = path + ".ok"  # written after a complete export (the weights go to a .data file beside the graph)
    if os.path.exists(path) and os.path.exists(done):
        return path
    os.makedirs(directory, exist_ok=True)
    wrapper = PaddedModel(encoder.model).eval()
    ids = torch.randint(0, 1000, (4, 17))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=8192)
    started = time.perf_counter()
    torch.onnx.export(wrapper, (ids, mask), path, input_names=["input_ids", "attention_mask"],
                      output_names=["hidden"], dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                                               "attention_mask": {0: batch, 1: seq}},
                      dynamo=True, optimize=True)
    with open(done, "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    print(f"  onnx: exported in {time.perf_counter() - started:.0f} s to {path}", file=sys.stderr)
    return path


def side_onnxruntime(model_name, rows, ranges):
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as error:
        raise Unavailable(f"{error.name} is not installed (pip install onnxruntime onnx onnxscript)") from None
    encoder = LLM2Vec.from_pretrained(model_name, dtype=torch.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads spin after a run by default, which would steal the cores from the side timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(_onnx_file(model_name, encoder), options, providers=["CPUExecutionProvider"])
    pad_id = encoder.tokenizer.pad_token_id

    def run():
        out = torch.empty(len(rows), encoder.config.hidden_size)
        for indices, ids, mask, batch_ranges in padded_batches(rows, ranges, pad_id):
            hidden = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            out[torch.tensor(indices)] = mean_pool(torch.from_numpy(hidden), batch_ranges)
        return out

    run()
    return run, f"onnxruntime {ort.__version__}, {BATCH} texts per batch"


def _gguf_converter():
    """convert_hf_to_gguf.py from llama-cpp-python's source distribution (pip's cache makes this a local step)."""
    directory = os.path.join(cache_root(), "bench", "llama_cpp_src")
    found = glob.glob(os.path.join(directory, "**", "convert_hf_to_gguf.py"), recursive=True)
    if found:
        return found[0]
    import llama_cpp

    os.makedirs(directory, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", directory,
                    f"llama-cpp-python=={llama_cpp.__version__}"], check=True, capture_output=True)
    for archive in glob.glob(os.path.join(directory, "*.tar.gz")):
        subprocess.run(["tar", "-xzf", archive, "-C", directory], check=True)
    found = glob.glob(os.path.join(directory, "**", "convert_hf_to_gguf.py"), recursive=True)
    if not found:
        raise Unavailable("convert_hf_to_gguf.py not found in the llama-cpp-python source distribution")
    return found[0]


def _gguf_file(model_dir, outtype):
    directory = os.path.join(cache_root(), "bench", "gguf")
    path = os.path.join(directory, f"{os.path.basename(os.path.normpath(model_dir))}-{outtype}.gguf")
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    converter = _gguf_converter()
    result = subprocess.run([sys.executable, converter, model_dir, "--outtype", outtype, "--outfile", path + ".tmp"],
                            capture_output=True, text=True, cwd=os.path.dirname(converter))
    if result.returncode != 0:
        raise Unavailable(f"convert_hf_to_gguf.py failed: {result.stderr.strip().splitlines()[-1][:200]}")
    os.replace(path + ".tmp", path)
    return path


def side_llama_cpp(model_name, outtype, rows, ranges):
    try:
        import llama_cpp
    except ImportError:
        raise Unavailable("llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)") from None
    from llm2vec_fast.loading import resolve_directory

    model_dir = resolve_directory(model_name, "model")
    path = _gguf_file(model_dir, outtype.lower())
    import numpy as np

    budget = 1024  # tokens per decode, our default budget (every text here is shorter)
    llm = llama_cpp.Llama(model_path=path, embedding=True, n_ctx=budget, n_batch=budget, n_ubatch=budget,
                          n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(), verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE, flash_attn=True)
    llama_cpp.llama_set_causal_attn(llm.ctx, False)
    n_embd, n_seq_max = llm.n_embd(), llm.context_params.n_seq_max
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    if len(rows[order[0]]) > budget:
        raise Unavailable(f"a text of {len(rows[order[0]])} tokens exceeds the {budget}-token context")

    def run():
        out = torch.empty(len(rows), n_embd)
        pending = []

        def flush():
            # As Llama.embed does, with our token ids (BOS included): one decode per batch of sequences, the
            # per-token states read back and pooled over the same range as ours.
            llm._ctx.kv_cache_clear()
            llm._ctx.decode(llm._batch)
            llm._batch.reset()
            total = sum(len(rows[i]) for i in pending)
            flat = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings(llm._ctx.ctx), shape=(total * n_embd,))
            position = 0
            for i in pending:
                n = len(rows[i])
                start, end = ranges[i]
                hidden = torch.from_numpy(flat[position * n_embd:(position + n) * n_embd].reshape(n, n_embd))
                out[i] = hidden[start:end].float().mean(0)
                position += n
            pending.clear()

        used = 0
        for i in order:
            n = len(rows[i])
            if pending and (used + n > budget or len(pending) >= n_seq_max):
                flush()
                used = 0
            llm._batch.add_sequence(list(rows[i].input_ids), len(pending), True)
            pending.append(i)
            used += n
        if pending:
            flush()
        return out

    run()
    return run, f"llama-cpp-python {llama_cpp.__version__}, {outtype} GGUF, non-causal, flash attention, " \
                f"{budget}-token batches"


# ----------------------------------------------------------------------------------------------------- main


def run(model_name="smollm2-135m", sides=SIDES, n_sentences=300, n_paragraphs=20, rounds=2, out=None):
    texts = benchmark_texts(n_sentences, n_paragraphs)
    probe = LLM2Vec.from_pretrained(model_name, dtype=torch.float32)
    rows = probe.tokenize_inputs(texts)
    ranges = probe._ranges(rows)
    lengths = [len(r) for r in rows]
    tokens = sum(lengths)
    # Attention FLOPs grow with each text's own length: the mean length weighted by tokens.
    per_token = flops_per_token(probe.model, sum(n * n for n in lengths) / tokens)
    print(f"# {len(texts)} texts, {tokens} tokens, {per_token / 1e6:.0f} MFLOP per token, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    runners, notes, unavailable = {}, {}, {}
    for side in sides:
        runtime, _, mode = side.rpartition("-")
        started = time.perf_counter()
        try:
            if runtime == "ours":
                runners[side], notes[side] = side_ours(model_name, mode, texts), "packed engine, C++ ops"
            elif runtime == "ours-batch32":
                runners[side], notes[side] = side_ours(model_name, mode, texts, batch_size=BATCH), \
                    f"encode(batch_size={BATCH}), the reference's default"
            elif runtime == "llm2vec-0.2.3":
                runners[side], notes[side] = side_reference(model_name, mode, texts), "algorithm re-implemented"
            elif runtime == "torch.compile":
                runners[side], notes[side] = side_compile(model_name, mode, rows, ranges), \
                    f"dynamic shapes, {BATCH} texts per batch"
            elif runtime == "onnxruntime":
                runners[side], notes[side] = side_onnxruntime(model_name, rows, ranges)
            elif runtime == "llama.cpp":
                runners[side], notes[side] = side_llama_cpp(model_name, mode, rows, ranges)
            else:
                raise ValueError(f"unknown side {side!r}; choose from {', '.join(SIDES)}")
        except Unavailable as error:
            unavailable[side] = str(error)
            print(f"  {side}: unavailable: {error}", file=sys.stderr)
            continue
        except Exception as error:  # a peer that breaks on this machine is reported, not fatal
            unavailable[side] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            print(f"  {side}: {unavailable[side]}", file=sys.stderr)
            continue
        print(f"  {side}: ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    times = {side: [] for side in runners}
    embeddings = {}
    ceilings = {"float32": [], "bfloat16": []}
    for r in range(rounds):
        for dtype in ceilings:
            ceilings[dtype].append(gemm_ceiling(probe.model, getattr(torch, dtype)))
        for side, fn in runners.items():
            started = time.perf_counter()
            embeddings[side] = fn()
            times[side].append(time.perf_counter() - started)
            print(f"  round {r + 1}: {side} {tokens / times[side][-1]:,.0f} tok/s", file=sys.stderr)

    truth = embeddings.get("ours-float32")
    cosine = torch.nn.functional.cosine_similarity
    result_rows = []
    best = {side: min(ts) for side, ts in times.items()}
    ceiling = {dtype: max(values) for dtype, values in ceilings.items()}
    for side in sides:
        runtime, _, mode = side.rpartition("-")
        klass = CLASS[mode]
        row = dict(device=device_name("cpu"), commit=git_commit(), op=f"encode ({klass} class)", backend=side,
                   shape=dict(texts=len(texts), tokens=tokens, dtype=klass), ms=None, rate=None, unit="tokens/s",
                   ratio=None, correct=None, note=notes.get(side, ""), rounds_tok_s=None, mean_cosine=None,
                   min_cosine=None, ceiling_fraction=None)
        if side in unavailable:
            row["note"] = f"unavailable: {unavailable[side]}"
            result_rows.append(row)
            continue
        row["ms"] = best[side] * 1e3
        row["rate"] = tokens / best[side]
        row["rounds_tok_s"] = [round(tokens / t, 1) for t in times[side]]
        row["ceiling_fraction"] = row["rate"] * per_token / (ceiling[klass] * 1e9)
        if truth is not None:
            c = cosine(embeddings[side].float(), truth, dim=-1)
            row["mean_cosine"], row["min_cosine"] = float(c.mean()), float(c.min())
            row["correct"] = klass != "float32" or row["min_cosine"] >= FP32_AGREEMENT
            if not row["correct"]:
                row["note"] = f"CORRECTNESS FAILED min cosine to ours-float32 {row['min_cosine']:.6f}"
                row["ms"] = row["rate"] = row["ceiling_fraction"] = None
        result_rows.append(row)
    for row in result_rows:
        anchor = "ours-float32" if row["shape"]["dtype"] == "float32" else "ours-bfloat16"
        ours = next((r for r in result_rows if r["backend"] == anchor and r["rate"]), None)
        if ours is not None and row["rate"]:
            row["ratio"] = row["rate"] / ours["rate"]

    meta = dict(model=model_name, texts=len(texts), tokens=tokens, flops_per_token=per_token,
                threads=torch.get_num_threads(), rounds=rounds, torch=torch.__version__,
                gemm_ceiling_gflops={k: [round(v, 1) for v in vs] for k, vs in ceilings.items()},
                ceiling_tok_s={k: round(v * 1e9 / per_token, 1) for k, v in ceiling.items()},
                bf16_flags=sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()),
                load_average=os.getloadavg(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                ratio="rate / llm2vec-fast's rate in the same dtype class (ours-float32 or ours-bfloat16)")
    print_table(result_rows, meta)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(dict(device=device_name("cpu"), commit=git_commit(), meta=meta, rows=result_rows), f, indent=1,
                      default=str)
    return result_rows, meta


def print_table(rows, meta):
    print(f"# {rows[0]['device'] if rows else ''}  commit {rows[0]['commit'] if rows else ''}  {meta['tokens']} "
          f"tokens, {meta['flops_per_token'] / 1e6:.0f} MFLOP/token; GEMM ceiling GFLOP/s "
          f"{meta['gemm_ceiling_gflops']} -> {meta['ceiling_tok_s']} tok/s")
    print(f"{'side':<26}{'tok/s':>9}{'ratio':>8}{'ceiling':>9}{'mean cos':>11}{'min cos':>10}  note")
    for r in rows:
        rate = f"{r['rate']:,.0f}" if r["rate"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        frac = f"{r['ceiling_fraction']:.0%}" if r["ceiling_fraction"] else "-"
        mean = f"{r['mean_cosine']:.6f}" if r["mean_cosine"] is not None else "-"
        low = f"{r['min_cosine']:.6f}" if r["min_cosine"] is not None else "-"
        print(f"{r['backend']:<26}{rate:>9}{ratio:>8}{frac:>9}{mean:>11}{low:>10}  {r['note']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--paragraphs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    rows, _ = run(args.model, args.sides, args.sentences, args.paragraphs, args.rounds, args.out)
    return 1 if any(r["correct"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
