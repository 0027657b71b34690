"""sentence-transformers against llm2vec-fast on the same sentence-transformers directory: one process, the same
texts, both sides.

    python benchmarks/bench_st.py [--sentences 48] [--paragraphs 2] [--dtypes float32 bfloat16]
                                  [--out benchmarks/results/st_cpu.json]

Two directories are built once (in <cache>/bench) from the embedded SmolLM2-135M, in the layouts of today's
decoder embedders: "mean-bidirectional" (config is_causal: false, mean pooling, Normalize: LLM2Vec / EmbeddingGemma
style) and "lasttoken-causal" (last-token pooling, Normalize, an instruction prompt: Qwen3-Embedding style); with
--layouts qwen3-lasttoken-causal gemma3-mean-bidirectional-dense, random-weight Qwen3 and Gemma 3 models of the same
size in the layouts of Qwen3-Embedding and EmbeddingGemma (sliding layers, two Dense layers).
For each layout and dtype (CPU float32 and bfloat16; CUDA bfloat16 too when a GPU is present) both
`SentenceTransformer(dir).encode(texts)` (batch_size 32, its default) and
`LLM2Vec.from_pretrained(dir).encode(texts)` embed the texts, a quarter of them as queries with the named prompt.
Each row: tokens/s (the texts' token count as sentence-transformers tokenizes them, the same for both sides), the
ratio to sentence-transformers in the same group (> 1: ours is faster), and the agreement: min cosine between the
two sides' embeddings, and each side's min cosine to sentence-transformers' float32 embeddings. A row is correct
when float32 agrees to 0.9999 and, in bfloat16, our largest 1 - cosine to sentence-transformers' float32
embeddings is at most twice its own. On CUDA sentence-transformers runs its flash-attention-2 padding-free path
when `flash_attn` (or the `kernels` package) is importable, else SDPA on padded batches, as the row's note says.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encode import benchmark_texts  # noqa: E402
from harness import Bench  # noqa: E402

from llm2vec_fast import LLM2Vec  # noqa: E402
from llm2vec_fast.default_model import cache_root, default_model_dir  # noqa: E402

LAYOUTS = {
    "mean-bidirectional": dict(pooling="mean", causal=False, prompts={"query": "query: "}),
    "lasttoken-causal": dict(pooling="lasttoken", causal=True, prompts={
        "query": "Instruct: Given a web search query, retrieve relevant passages\nQuery:"}),
}
# Today's embedder families, as random-weight models of SmolLM2-135M's size (the speed of an architecture does not
# depend on its weights; no such checkpoint is available offline): Qwen3-Embedding's layout (causal, last token,
# full attention) and EmbeddingGemma's (bidirectional Gemma 3 with sliding layers, mean pooling, two Dense layers).
FAMILY_LAYOUTS = {
    "qwen3-lasttoken-causal": dict(family="qwen3", pooling="lasttoken", causal=True, dense=(),
                                   config=dict(head_dim=64, use_sliding_window=False,
                                               layer_types=["full_attention"] * 30),
                                   prompts=LAYOUTS["lasttoken-causal"]["prompts"]),
    "gemma3-mean-bidirectional-dense": dict(family="gemma3_text", pooling="mean", causal=False, dense=(1152, 576),
                                            config=dict(head_dim=64, sliding_window=128, query_pre_attn_scalar=64,
                                                        use_bidirectional_attention=True,
                                                        layer_types=(["sliding_attention"] * 5
                                                                     + ["full_attention"]) * 5),
                                            prompts={"query": "task: search result | query: "}),
}
LAYOUTS = {**LAYOUTS, **FAMILY_LAYOUTS}
MAX_SEQ_LENGTH = 512
ST_BATCH = 32


def _family_weights(spec: dict, source: str, staging: str) -> dict:
    """Save a random-weight model of spec's family with SmolLM2-135M's shapes into `staging`; its config dict."""
    from llm2vec_fast.testing import SMOLLM2_135M, random_model

    with open(os.path.join(source, "config.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    shapes = {k: v for k, v in SMOLLM2_135M.items() if k != "rope_theta"}
    model = random_model(spec["family"], vocab_size, spread=None, **shapes, **spec["config"])
    model.save_pretrained(staging)
    with open(os.path.join(staging, "config.json")) as f:
        return json.load(f)


def build_directory(layout: str) -> str:
    """The sentence-transformers directory of `layout` on the embedded model (built once, ~1 s: links to the
    weights and tokenizer, a config copy, the module configs)."""
    spec = LAYOUTS[layout]
    source = default_model_dir()
    target = os.path.join(cache_root(), "bench", f"st-{layout}")
    if os.path.isfile(os.path.join(target, "modules.json")):
        return target
    staging = target + f".tmp{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    family = "family" in spec
    for name in os.listdir(source):
        weights = name.endswith((".safetensors", ".bin")) or name.endswith(".safetensors.index.json")
        if name != "config.json" and os.path.isfile(os.path.join(source, name)) and not (family and weights):
            os.symlink(os.path.join(source, name), os.path.join(staging, name))
    if family:
        config = _family_weights(spec, source, staging)
    else:
        with open(os.path.join(source, "config.json")) as f:
            config = json.load(f)
    if not spec["causal"]:
        config["is_causal"] = False
    hidden = config["hidden_size"]

    def write(relative, value):
        os.makedirs(os.path.dirname(os.path.join(staging, relative)), exist_ok=True)
        with open(os.path.join(staging, relative), "w") as f:
            json.dump(value, f, indent=2)

    write("config.json", config)
    write("sentence_bert_config.json", {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    write("1_Pooling/config.json", {"embedding_dimension": hidden, "pooling_mode": spec["pooling"],
                                    "include_prompt": True})
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    width = hidden
    for out_features in spec.get("dense", ()):
        folder = f"{len(modules)}_Dense"
        write(f"{folder}/config.json", {"in_features": width, "out_features": out_features, "bias": False,
                                        "activation_function": "torch.nn.modules.linear.Identity"})
        generator = torch.Generator().manual_seed(len(modules))
        weight = torch.randn(out_features, width, generator=generator) * width ** -0.5
        from safetensors.torch import save_file

        save_file({"linear.weight": weight}, os.path.join(staging, folder, "model.safetensors"))
        modules.append((folder, "sentence_transformers.models.Dense"))
        width = out_features
    folder = f"{len(modules)}_Normalize"
    write(f"{folder}/config.json", {})
    modules.append((folder, "sentence_transformers.models.Normalize"))
    write("modules.json", [{"idx": i, "name": str(i), "path": path, "type": kind}
                           for i, (path, kind) in enumerate(modules)])
    write("config_sentence_transformers.json", {"model_type": "SentenceTransformer", "prompts": spec["prompts"],
                                                "default_prompt_name": None, "similarity_fn_name": "cosine"})
    os.replace(staging, target)
    return target


def flash_attention_available() -> str | None:
    """The attn_implementation for sentence-transformers' padding-free path on CUDA, or None without one."""
    for module in ("flash_attn", "kernels"):
        try:
            __import__(module)
            return "flash_attention_2"
        except ImportError:
            continue
    return None


def run(dtypes=("float32", "bfloat16"), n_sentences=48, n_paragraphs=2, out=None, layouts=tuple(LAYOUTS)):
    from sentence_transformers import SentenceTransformer

    texts = benchmark_texts(n_sentences, n_paragraphs)
    queries = texts[: len(texts) // 4]  # a quarter of the texts are queries, with the named prompt
    documents = texts[len(texts) // 4:]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for device in devices:
        bench = Bench(device, warmup=1, repeats=2, max_seconds=30.0)
        for layout in layouts:
            path = build_directory(layout)
            truth = None
            for dtype_name in (dtypes if device == "cpu" else ("bfloat16",)):
                dtype = getattr(torch, dtype_name)
                note = ""
                model_kwargs = {"dtype": dtype}
                if device == "cuda":
                    attention = flash_attention_available()
                    if attention:
                        model_kwargs["attn_implementation"] = attention
                        note = "ST: flash_attention_2 padding-free"
                    else:
                        note = "ST: SDPA padded (no flash_attn / kernels package here)"
                st = SentenceTransformer(path, device=device, model_kwargs=model_kwargs)
                ours = LLM2Vec.from_pretrained(path, dtype=dtype)

                def st_encode():
                    q = st.encode(queries, prompt_name="query", batch_size=ST_BATCH, convert_to_tensor=True)
                    d = st.encode(documents, batch_size=ST_BATCH, convert_to_tensor=True)
                    return torch.cat([q, d]).float().cpu()

                def our_encode():
                    q = ours.encode(queries, prompt_name="query", device=device, show_progress_bar=False)
                    d = ours.encode(documents, device=device, show_progress_bar=False)
                    return torch.cat([q, d])

                tokens = (_token_count(st, queries, st.prompts["query"]) + _token_count(st, documents, ""))
                st_vectors, our_vectors = st_encode(), our_encode()
                if truth is None and dtype_name == "float32" and device == "cpu":
                    truth = st_vectors
                cosine = torch.nn.functional.cosine_similarity
                agreement = cosine(st_vectors, our_vectors, dim=-1).min().item()
                shape = dict(layout=layout, dtype=dtype_name, texts=len(texts), tokens=tokens)
                vs_truth = "" if truth is None else (
                    f"; min cos to ST fp32: ST {cosine(st_vectors, truth, dim=-1).min().item():.5f}, ours "
                    f"{cosine(our_vectors, truth, dim=-1).min().item():.5f}")
                st_row = bench.run("st_encode", "sentence-transformers", shape, st_encode, tokens=tokens,
                                   baseline=True, note=note)
                if dtype_name == "float32" or truth is None:
                    ok = agreement > (0.9999 if dtype_name == "float32" else 0.95)
                else:  # the project's rule: our error against float32 at most twice sentence-transformers' own
                    ours_error = (1 - cosine(our_vectors, truth, dim=-1)).max().item()
                    st_error = (1 - cosine(st_vectors, truth, dim=-1)).max().item()
                    ok = ours_error <= 2 * st_error + 1e-6
                our_row = bench.run("st_encode", "llm2vec-fast", shape, our_encode, tokens=tokens, ours=True,
                                    check=lambda: (ok, f"min cosine {agreement:.6f}"),
                                    note=f"min cos(ST, ours) {agreement:.6f}{vs_truth}")
                st_row["agreement"] = our_row["agreement"] = agreement
                for row in (st_row, our_row):
                    print(f"{layout} {dtype_name} {row['backend']}: {row['rate'] or 0:,.0f} tokens/s "
                          f"(ratio {row['ratio'] or 0:.2f}) {row['note']}", flush=True)
                del st, ours
                saved = _save(bench, out, device)  # after every pair: a run cut short keeps what it measured
        bench.print_table()
        results[device] = bench
        if out:
            try:
                from plots import plot_bench

                with open(saved) as f:
                    plot_bench(json.load(f), saved.replace(".json", ".png"),
                               "sentence-transformers vs llm2vec-fast, same ST directory")
            except (ImportError, SystemExit) as error:  # matplotlib missing (plots exits): the JSON is the result
                print(f"no chart: {error}", file=sys.stderr)
    return results


def _save(bench, out, device):
    if not out:
        return None
    path = out if device == "cpu" else out.replace("_cpu", f"_{device}")
    return bench.save(path, extra=dict(threads=torch.get_num_threads(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
                                       st_batch_size=ST_BATCH, max_seq_length=MAX_SEQ_LENGTH,
                                       load_average=_load_average()))


def _token_count(st, texts, prompt) -> int:
    """Tokens the model sees for `texts` with `prompt`, as sentence-transformers tokenizes them (truncated)."""
    tokenizer = st.tokenizer
    ids = tokenizer([prompt + t for t in texts], truncation=True, max_length=st.max_seq_length)["input_ids"]
    return sum(len(x) for x in ids)


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=48)
    parser.add_argument("--paragraphs", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "st_cpu.json"))
    args = parser.parse_args(argv)
    results = run(args.dtypes, args.sentences, args.paragraphs, args.out, tuple(args.layouts))
    return 1 if any(bench.failures() for bench in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
