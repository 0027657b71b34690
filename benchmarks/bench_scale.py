"""Encode at corpus scale: throughput and peak memory against corpus size for the three ways to run `encode`.

    python benchmarks/bench_scale.py [--sizes 10000 100000 1000000] [--engines single torchrun2 ray2]
                                     [--out benchmarks/results/scale_cpu.json]

Each run is the real command line in a fresh process tree, on a Parquet corpus of short random texts
(llm2vec_fast.testing.corpus, 3-15 words) with a tiny random Llama (hidden 64, 2 layers; what is measured is the
job around the model: reading, tokenizing, scheduling, writing), float32, Parquet output, default shard size
(10,000):
- single:    `llm2vec-fast encode` in one process with one thread (OMP_NUM_THREADS=1);
- torchrun2: `torchrun --nproc_per_node 2 -m llm2vec_fast encode` (one thread per rank);
- ray2:      `encode --engine ray --ray-actors 2` on a new local Ray instance (one CPU, one thread per actor);
- single-allthreads (only when asked for): one process with torch's default threads.
So single -> torchrun2 / ray2 is one worker -> two workers of one thread each.
Peak memory is the largest sum of PSS (proportional set size: a page shared by k processes counts 1/k in each, so
Ray's shared-memory object store is counted once, not once per worker that maps it) over the command's whole
process tree (Ray's raylet and workers included), sampled every 0.5 s; flat memory means it does not grow with the
corpus. Every output is checked (row count, line
numbers 1..N in order) before its time is reported. Writes a JSON of rows (rows of an earlier run in --out for
other sizes or engines are kept) and a chart beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import git_commit  # noqa: E402

ENGINES = ("single", "torchrun2", "ray2")
# Not in the default set: one process with torch's default thread count (all cores). On a machine whose cores are
# busy with other work, OpenMP's spinning threads make it far slower than one thread (see docs/performance.md, Scaling out).
EXTRA_ENGINES = ("single-allthreads",)


def write_corpus(path: str, n: int) -> None:
    """n short random texts as a Parquet file (row groups of 50,000), written in pieces to keep memory low."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llm2vec_fast.testing import corpus

    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for start in range(0, n, 50_000):
            writer.write_table(pa.table({"text": corpus(min(50_000, n - start), seed=start)}))


def command(engine: str, model: str, data: str, out: str) -> tuple[list[str], dict]:
    # --dtype float32 for all: auto would pick bf16 matmuls for the local engines where the CPU has them, and
    # float32 for Ray (its workers may be other machines), so the engines would not compute the same thing.
    base = ["encode", "--model", model, "--input", data, "--output", out, "--output-format", "parquet",
            "--dtype", "float32", "--no-progress"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if engine == "single-allthreads":
        return [sys.executable, "-m", "llm2vec_fast", *base], env
    if engine == "single":
        env.update(OMP_NUM_THREADS="1")
        return [sys.executable, "-m", "llm2vec_fast", *base], env
    if engine == "torchrun2":
        env.update(OMP_NUM_THREADS="1")
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", "29517", "-m", "llm2vec_fast", *base], env
    env.update(OMP_NUM_THREADS="1", RAY_ADDRESS="")
    return [sys.executable, "-m", "llm2vec_fast", *base, "--engine", "ray", "--ray-actors", "2",
            "--ray-cpus-per-actor", "1"], env


def run_measured(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak PSS of the process tree in MiB, stderr) of one command."""
    import psutil

    peak = [0]
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    done = threading.Event()

    def sample():
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    _stop_leftover_ray(process.pid)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{err[-3000:]}")
    return seconds, peak[0] / 2**20, err


def _stop_leftover_ray(session_leader: int) -> None:
    # ray.shutdown() in the command stops its instance; anything of its session still alive is ended here.
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == session_leader:
                p.kill()
        except (OSError, psutil.Error):
            pass


def check_output(out: str, n: int) -> None:
    """Refuse to report a run whose output lacks rows or has them out of order."""
    from llm2vec_fast.encode_job import load_embeddings

    embeddings, lines = load_embeddings(out)
    if embeddings.shape[0] != n or lines.tolist() != list(range(1, n + 1)):
        raise RuntimeError(f"{out}: {embeddings.shape[0]} rows for {n} texts, or lines out of order")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--engines", nargs="+", choices=ENGINES + EXTRA_ENGINES, default=list(ENGINES))
    parser.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--out", default="benchmarks/results/scale_cpu.json")
    args = parser.parse_args(argv)

    from llm2vec_fast.testing import build_model_dir

    work = args.work or tempfile.mkdtemp(prefix="bench-scale-")
    model = build_model_dir(os.path.join(work, "model"), "llama")
    rows = _earlier_rows(args.out, args.sizes, args.engines)
    for n in args.sizes:
        data = os.path.join(work, f"corpus-{n}.parquet")
        if not os.path.exists(data):
            write_corpus(data, n)
        for engine in args.engines:
            out = os.path.join(work, f"out-{engine}-{n}")
            subprocess.run(["rm", "-rf", out], check=True)
            argv_, env = command(engine, model, data, out)
            seconds, peak_mib, _ = run_measured(argv_, env)
            check_output(out, n)
            row = {"engine": engine, "texts": n, "seconds": round(seconds, 2), "texts_per_s": round(n / seconds, 1),
                   "peak_pss_mib": round(peak_mib, 1), "commit": git_commit(), "cpus": os.cpu_count(),
                   "omp_num_threads": env.get("OMP_NUM_THREADS", "default"),
                   "command": " ".join(argv_[1:]).replace(work, "$WORK")}
            rows.append(row)
            print(f"{engine:10s} {n:>9,d} texts  {seconds:8.1f} s  {n / seconds:9,.0f} texts/s  "
                  f"peak {peak_mib:8,.0f} MiB", flush=True)
            _save(args.out, rows)
    _plot(rows, os.path.splitext(args.out)[0] + ".png")
    return 0


def _earlier_rows(path: str, sizes, engines) -> list[dict]:
    """The rows of an earlier run in `path` that this run does not measure again (runs add up: 1M texts take long)."""
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return []
    return [r for r in rows if not (r["texts"] in sizes and r["engine"] in engines)]


def _save(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temp = path + ".tmp"
    with open(temp, "w") as f:
        json.dump({"benchmark": "bench_scale", "rows": rows}, f, indent=1)
        f.write("\n")
    os.replace(temp, path)


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is absent: no chart", file=sys.stderr)
        return
    fig, (rate, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for engine in ENGINES + EXTRA_ENGINES:
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["texts"])
        if not mine:
            continue
        sizes = [r["texts"] for r in mine]
        rate.plot(sizes, [r["texts_per_s"] for r in mine], marker="o", label=engine)
        memory.plot(sizes, [r["peak_pss_mib"] for r in mine], marker="o", label=engine)
    for axis, label in ((rate, "texts / s (whole command)"), (memory, "peak PSS of the process tree (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("corpus size (texts)")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    rate.set_title("encode throughput")
    memory.set_title("encode peak memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
