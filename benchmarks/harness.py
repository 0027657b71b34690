"""Shared timing harness for the kernel, encode and training benchmarks.

    bench = Bench(device)
    bench.run("attn_fwd", "sdpa-flash", shape, fn, flops=..., check=..., baseline=True)
    bench.run("attn_fwd", "ours", shape, fn, flops=..., check=...)
    bench.print_table(); bench.save("benchmarks/results/kernels.json")

Each row: device, git commit, op, backend, shape, median / p20 / p80 time, derived rate (TFLOP/s, GB/s or
tokens/s), peak memory, and the speed ratio to the baseline row of the same (op, shape) measured in the same run
(fastest baseline time / this time: > 1 means faster). A row whose correctness check fails gets no time and no rate.
A peer that raises (a backend without support for the shape) is reported as unavailable; one of our own rows
(``ours=True``) that raises is a failure, as a failed check is, so the run exits non-zero.
"""

import csv
import json
import os
import platform
import statistics
import subprocess
import time

import torch


def git_commit():
    """The commit measured: HEAD, with "+dirty" when tracked code differs from it. Result files are left out of
    that check: a benchmark run right after another has only the other's outputs changed, not what it measures."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "uncommitted"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def measure(fn, device, warmup=3, repeats=20, max_seconds=10.0):
    """Run fn warmup times, then up to `repeats` timed calls (fewer if they exceed max_seconds in total).
    Returns times in ms (median, p20, p80, n) and the peak memory in MiB (GPU only; None on CPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    budget_start = time.perf_counter()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - budget_start > max_seconds and len(times) >= 3:
            break
    qs = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return dict(ms=statistics.median(times), ms_p20=qs[0], ms_p80=qs[3], n=len(times), peak_mib=peak)


class Bench:
    """Collects result rows for one device and one run."""

    def __init__(self, device, warmup=3, repeats=20, max_seconds=10.0):
        self.device = torch.device(device)
        self.device_name = device_name(self.device)
        self.commit = git_commit()
        self.warmup, self.repeats, self.max_seconds = warmup, repeats, max_seconds
        self.rows = []

    def run(self, op, backend, shape, fn, *, flops=None, nbytes=None, tokens=None, check=None, baseline=False,
            ours=False, note=""):
        """Time fn (no arguments) after an optional correctness check (a callable returning True/False or
        (ok, message)). Exactly one of flops / nbytes / tokens gives the rate (TFLOP/s, GB/s, tokens/s). Rows
        marked baseline=True compete: the fastest of them in an (op, shape) group is that group's denominator.
        ``ours=True`` marks this project's own implementation: an exception in it fails the row."""
        row = dict(device=self.device_name, commit=self.commit, op=op, backend=backend, shape=shape,
                   ms=None, ms_p20=None, ms_p80=None, n=0, rate=None, unit=None, ratio=None, peak_mib=None,
                   correct=None, baseline=baseline, note=note)
        try:
            if check is not None:
                res = check()
                ok, msg = res if isinstance(res, tuple) else (bool(res), "")
                row["correct"] = bool(ok)
                if not ok:
                    row["note"] = f"CORRECTNESS FAILED {msg}".strip()
                    self.rows.append(row)
                    return row
            row.update(measure(fn, self.device, self.warmup, self.repeats, self.max_seconds))
        except Exception as exc:
            first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
            if ours:
                row["correct"] = False
                row["note"] = f"FAILED: {type(exc).__name__}: {first_line}"
            else:  # a peer that does not support the shape is reported, not fatal
                row["note"] = f"unavailable: {type(exc).__name__}: {first_line}"
            self.rows.append(row)
            return row
        seconds = row["ms"] / 1e3
        if flops is not None:
            row["rate"], row["unit"] = flops / seconds / 1e12, "TFLOP/s"
        elif nbytes is not None:
            row["rate"], row["unit"] = nbytes / seconds / 1e9, "GB/s"
        elif tokens is not None:
            row["rate"], row["unit"] = tokens / seconds, "tokens/s"
        row["baseline"] = baseline
        self.rows.append(row)
        self._ratios()
        return row

    def _ratios(self):
        """ratio = (fastest baseline row of the same op and shape) time / this row's time."""
        best = {}
        for r in self.rows:
            if r.get("baseline") and r["ms"] is not None:
                key = (r["op"], str(r["shape"]))
                best[key] = min(best.get(key, float("inf")), r["ms"])
        for r in self.rows:
            key = (r["op"], str(r["shape"]))
            if r["ms"] is not None and key in best:
                r["ratio"] = best[key] / r["ms"]

    def failures(self):
        return [r for r in self.rows if r["correct"] is False]

    def print_table(self, file=None):
        print(f"# device: {self.device_name}   commit: {self.commit}", file=file)
        print(f"{'op':<16}{'backend':<20}{'shape':<46}{'ms':>10}{'rate':>12} {'unit':<9}{'ratio':>7}  note",
              file=file)
        for r in self.rows:
            ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
            rate = f"{r['rate']:.4g}" if r["rate"] is not None else "-"
            ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"
            print(f"{r['op']:<16}{r['backend']:<20}{str(r['shape']):<46}{ms:>10}{rate:>12} {r['unit'] or '':<9}"
                  f"{ratio:>7}  {r['note']}", file=file)

    def save(self, path, extra=None):
        """Write the rows as JSON (``.json``, with ``extra`` metadata) or CSV (any other suffix)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.endswith(".json"):
            with open(path, "w") as f:
                json.dump(dict(device=self.device_name, commit=self.commit, meta=extra or {}, rows=self.rows), f,
                          indent=1, default=str)
        else:
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(self.rows[0]) if self.rows else ["op"])
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: (str(v) if isinstance(v, dict) else v) for k, v in r.items()})
        return path
