"""Why does SimCSE add little in the CPU ablation? Train SimCSE variants from one MNTP adapter and score each on Lee.

The ablation (reproduce_ablation.py) trains MNTP once and SimCSE once with the reference recipe scaled down. This
script reuses that MNTP adapter and varies one SimCSE knob at a time (learning rate, steps, batch size, sequence
length, training text), so each row costs only its own SimCSE run (~8-12 s per step of 32 sentences x 48 tokens
on 2 idle cores). Results are appended to benchmarks/results/simcse_sweep.json after every variant, so a partial
run keeps what it measured.

    python benchmarks/reproduce_ablation.py                      # first: trains the MNTP adapter it starts from
    python benchmarks/simcse_sweep.py                            # the default variants
    python benchmarks/simcse_sweep.py --variant lr3e-4:learning_rate=3e-4,steps=40 --variant ...

A variant is NAME:key=value,... with keys from TrainConfig (learning_rate, steps, batch_size, max_length,
attention_dropout, scale, lora_dropout, ...) plus `text`: `sentences` (one Wikipedia sentence per example, the
recipe) or `chunksN` (N consecutive Wikipedia sentences per example, closer to the Lee documents' length).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import reproduce_ablation as ablation  # noqa: E402  (sets the offline environment variables)

BASE = dict(steps=40, batch_size=32, max_length=48, learning_rate=5e-5, text="sentences")
DEFAULT_VARIANTS = (
    "recipe-lr5e-5:",
    "lr3e-4:learning_rate=3e-4",
    "lr3e-4-chunks3:learning_rate=3e-4,text=chunks3,max_length=128",
)


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, body = spec.partition(":")
    if not name:
        raise SystemExit(f"variant {spec!r}: give it a name, as NAME:key=value,...")
    options = dict(BASE)
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {spec!r}: {item!r} is not key=value")
        default = options.get(key)
        options[key] = value if key == "text" else type(default)(value) if default is not None else _number(value)
    return name, options


def _number(value: str):
    try:
        return int(value)
    except ValueError:
        return float(value)


def training_text(kind: str, count: int, work_dir: str) -> str:
    """A .txt file of training examples, one per line: sentences, or chunks of N consecutive sentences."""
    from llm2vec_fast.offline_data import wikipedia_sentences

    sentences = list(wikipedia_sentences()[:count])
    if kind == "sentences":
        lines = sentences
    elif kind.startswith("chunks") and kind[6:].isdigit() and int(kind[6:]) > 0:
        size = int(kind[6:])
        lines = [" ".join(sentences[i:i + size]) for i in range(0, len(sentences), size)]
    else:
        raise SystemExit(f"text={kind!r}: use `sentences` or `chunksN` (e.g. chunks3)")
    path = os.path.join(work_dir, f"wiki_{kind}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", help="NAME:key=value,... (repeatable; default: "
                                                           + "; ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--mntp-dir", default=None, help="MNTP adapter to start from (default: the ablation's)")
    parser.add_argument("--train-sentences", type=int, default=ablation.FULL["train_sentences"])
    parser.add_argument("--eval-max-length", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=os.path.join(ablation.RESULTS, "simcse_sweep.json"))
    args = parser.parse_args(argv)

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.default_model import cache_root
    from llm2vec_fast.evaluation.similarity import lee_pairs

    work_dir = os.path.join(cache_root(), "simcse_sweep")
    os.makedirs(work_dir, exist_ok=True)
    mntp_dir = args.mntp_dir or os.path.join(cache_root(), "ablation", "mntp")
    if not os.path.isfile(os.path.join(mntp_dir, "adapter_config.json")):
        raise SystemExit(f"no MNTP adapter in {mntp_dir}: run benchmarks/reproduce_ablation.py first, or pass "
                         f"--mntp-dir")
    with open(os.path.join(mntp_dir, "train_config.json")) as f:
        mntp_config = json.load(f)
    pairs = lee_pairs()
    report = {"mntp_dir": mntp_dir, "mntp_steps": mntp_config.get("steps"), "commit": ablation.commit(),
              "device": f"cpu ({torch_threads()} threads)", "rows": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            report["rows"] = json.load(f).get("rows", [])

    encoder = LLM2Vec.from_pretrained(mntp_dir, pooling_mode="mean", max_length=args.eval_max_length)
    baseline = ablation.score("Bi + MNTP (start)", ablation.llm2vec_embed(encoder), {"lee": pairs}, {})
    del encoder
    report["start"] = {"spearman": baseline["spearman"], "pearson": baseline["pearson"]}

    for spec in args.variant or DEFAULT_VARIANTS:
        name, options = parse_variant(spec)
        text = options.pop("text")
        data = training_text(text, args.train_sentences, work_dir)
        output = os.path.join(work_dir, name)
        print(f"{name}: {options}, text={text}", flush=True)
        train = ablation.train_stage("simcse", args, model=mntp_dir, data=data, output=output, **options)
        encoder = LLM2Vec.from_pretrained(mntp_dir, peft_model_name_or_path=output, merge_peft=True,
                                          pooling_mode="mean", max_length=args.eval_max_length)
        row = ablation.score(f"+ SimCSE {name}", ablation.llm2vec_embed(encoder), {"lee": pairs},
                             {"options": {**options, "text": text}, "train": train,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        del encoder
        report["rows"].append(row)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"written: {args.out}")
    return 0


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main())
