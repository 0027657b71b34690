"""Charts of the benchmark results: the ablation table and every harness.Bench JSON in benchmarks/results.

    python benchmarks/plots.py                      # reads benchmarks/results/*.json, writes PNGs beside them
    python benchmarks/plots.py --results DIR --out DIR

- ablation.json (and ablation_quick.json): Spearman and Pearson per variant, as grouped bars with their 95%
  bootstrap intervals; the word-pair sets in a second panel.
- Bench files (encode_cpu.json, kernels/train results: {device, commit, meta, rows: [{op, backend, shape, ms, rate,
  unit, ratio, ...}]}): one chart per file, one panel per op, bars of the rate per shape and backend, each bar
  labelled with its ratio to the baseline of the same run. Rows whose correctness check failed are drawn hatched.
Needs matplotlib (the `eval` extra).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots need matplotlib: pip install matplotlib (or the `eval` extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shape_label(shape, width: int = 36) -> str:
    if isinstance(shape, dict):
        # The op is the panel's title already; long shapes wrap so that neighbouring labels do not overlap.
        text = ", ".join(f"{k}={v}" for k, v in shape.items() if k != "op")
        return textwrap.fill(text, width=width)
    return str(shape)


def plot_ablation(report: dict, path: str) -> str:
    """Grouped bars per variant with 95% bootstrap intervals when the report has them: Lee (Spearman, Pearson)
    on the left, the word-pair sets (Spearman) on the right when present."""
    plt = _pyplot()
    rows = report["rows"]
    names = [r["variant"] for r in rows]
    word_sets = list(rows[0].get("word_sets", {}))
    panels = [("Lee et al. (2005), " + f"{report['pairs']} document pairs",
               [(m.capitalize(), [r for r in rows], m) for m in ("spearman", "pearson")])]
    if word_sets:
        panels.append(("word pairs (Spearman)", [(n, [r["word_sets"][n] for r in rows], "spearman") for n in word_sets]))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 1.3 * len(rows)) * len(panels), 4.6), squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels):
        width = 0.8 / len(series)
        xs = range(len(rows))
        for k, (label, results, metric) in enumerate(series):
            values = [r[metric] for r in results]
            offset = (k - (len(series) - 1) / 2) * width
            errors = None
            if all(f"{metric}_ci" in r for r in results):  # asymmetric bars: [value - low, high - value]
                errors = [[v - r[f"{metric}_ci"][0] for v, r in zip(values, results)],
                          [r[f"{metric}_ci"][1] - v for v, r in zip(values, results)]]
            bars = ax.bar([x + offset for x in xs], values, width, label=label, color=f"C{k}", yerr=errors,
                          capsize=2, error_kw={"linewidth": 0.8})
            for bar, value in zip(bars, values):
                ax.annotate(f"{value:.3f}", (bar.get_x() + bar.get_width() / 2, max(value, 0)), ha="center",
                            va="bottom", fontsize=6)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("correlation with human scores")
        ax.set_title(panel_title, fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=7)
    title = f"LLM2Vec ablation, {report['model']}"
    if any("spearman_ci" in r for r in rows):
        title += " (bars: 95% bootstrap intervals)"
    if report.get("quick"):
        title += "  [QUICK MODE: not a result]"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bench(bench: dict, path: str, title: str) -> str:
    plt = _pyplot()
    ops = list(dict.fromkeys(r["op"] for r in bench["rows"]))
    fig, axes = plt.subplots(len(ops), 1, figsize=(8, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in bench["rows"] if r["op"] == op and r.get("rate") is not None]
        chars = max(18, 110 // max(1, len({str(r["shape"]) for r in rows})))  # characters per label line
        shapes = list(dict.fromkeys(shape_label(r["shape"], chars) for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        width = 0.8 / max(1, len(backends))
        for b, backend in enumerate(backends):
            for s, shape in enumerate(shapes):
                match = [r for r in rows if r["backend"] == backend and shape_label(r["shape"], chars) == shape]
                if not match:
                    continue
                row = match[0]
                bar = ax.bar(s + (b - (len(backends) - 1) / 2) * width, row["rate"], width,
                             color=f"C{b}", label=backend if s == 0 else None,
                             hatch="//" if row.get("correct") is False else None)[0]
                ratio = row.get("ratio")
                if ratio is not None:
                    ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        # Headroom above the tallest bar, so its ratio label stays clear of the panel title.
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=7)
        units = {r.get("unit", "") for r in rows}
        ax.set_ylabel(" / ".join(sorted(u for u in units if u)) or "rate")
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: {bench.get('device', '')} (commit {bench.get('commit', '?')})", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # keep the first panel's title clear
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of result JSON files")
    parser.add_argument("--out", default=None, help="where to write PNGs (default: --results)")
    args = parser.parse_args(argv)
    out = args.out or args.results
    os.makedirs(out, exist_ok=True)
    written = []
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                print(f"skipping {path}: not JSON ({error.msg})", file=sys.stderr)
                continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
            continue
        if "variant" in data["rows"][0] and "pairs" in data:  # an ablation report (not a sweep's rows)
            written.append(plot_ablation(data, os.path.join(out, f"{stem}.png")))
        elif {"op", "backend", "rate"} <= set(data["rows"][0]):
            written.append(plot_bench(data, os.path.join(out, f"{stem}.png"), stem))
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no result files found in {args.results}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
