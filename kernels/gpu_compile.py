"""Ahead-of-time compilation of the kernels for a GPU target, on a machine without a GPU.

Triton compiles for ``GPUTarget("cuda", 90, 32)`` (Hopper) or ``("cuda", 80, 32)`` (Ampere) with no driver
present; its bundled ``cuobjdump`` reads the resulting cubin. This module turns one launch (kernel, pointer
dtypes, constexprs, warps, stages) into a :class:`KernelReport`: registers, stack, spill instructions, shared
memory, tensor-core instructions (``HGMMA`` = wgmma, ``HMMA`` = mma.sync) and the size of the innermost loop that
holds a matmul. ``python -m llm2vec_fast.kernels.gpu_compile`` prints them as a table for the launches the host
code makes (``attention.attention_launches``, the objects the host functions launch), and ``--sweep`` for
candidate tilings; the kernel tests hold a representative subset to limits (fits, tensor cores, no spills).

Reports are cached beside Triton's own artifacts (its cache manager, keyed by the compiled kernel's hash), so a
second run costs a cache lookup per launch.
"""

import dataclasses
import json
import os
import re
import subprocess
import tempfile

from ._common import _interpreting
from ._triton import require_triton, triton

# Dynamic shared memory one block may use (bytes): H100 227 KiB, A100 163 KiB (CUDA programming guide, table of
# compute capabilities). Triton reports what a kernel needs in ``metadata.shared``; more fails at launch.
SHARED_LIMIT = {90: 232448, 80: 166912}
MAX_REGISTERS = 255
_TRITON_DTYPE = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                 "torch.int32": "i32", "torch.int64": "i64", "torch.int8": "i8"}


@dataclasses.dataclass(frozen=True)
class KernelReport:
    name: str
    arch: int
    registers: int          # per thread (ptxas allocation; 255 is the ceiling)
    stack: int              # bytes of local memory per thread: > 0 means spilled registers (no kernel has arrays)
    spill_stores: int       # STL instructions in the SASS (static count)
    spill_loads: int        # LDL instructions in the SASS (static count)
    shared: int             # dynamic shared memory bytes the launch needs
    wgmma: int              # HGMMA instructions (Hopper warpgroup MMA)
    mma: int                # HMMA instructions (Ampere-style mma.sync)
    instructions: int       # SASS instructions in the whole kernel
    loop_instructions: int  # SASS instructions of the innermost loop holding a matmul (0: no such loop)

    @property
    def spills(self):
        return self.stack > 0 or self.spill_stores > 0

    @property
    def fits_shared(self):
        return self.shared <= SHARED_LIMIT[self.arch]


def _cuobjdump():
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's bundled cuobjdump is missing ({path}); install the NVIDIA backend of triton")
    return path


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def sass_instructions(cubin):
    """[(address, opcode, operands)] of a cubin's SASS, in address order."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    return [(int(a, 16), op, rest.strip()) for a, op, rest in _SASS_LINE.findall(text)], usage


def _innermost_matmul_loop(instructions):
    """Instructions of the smallest backward-branch span that contains a tensor-core instruction."""
    spans = []
    for addr, op, rest in instructions:
        if op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", rest)
            if target and int(target.group(1), 16) < addr:
                spans.append((int(target.group(1), 16), addr))
    best = 0
    for lo, hi in spans:
        ops = [op for a, op, _ in instructions if lo <= a <= hi]
        if any(op.startswith(("HGMMA", "HMMA")) for op in ops) and (best == 0 or len(ops) < best):
            best = len(ops)
    return best


def report_from_cubin(name, arch, cubin, shared):
    instructions, usage = sass_instructions(cubin)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    ops = [op for _, op, _ in instructions]
    return KernelReport(
        name=name, arch=arch, registers=int(regs.group(1)) if regs else 0,
        stack=int(stack.group(1)) if stack else 0,
        spill_stores=sum(op.startswith("STL") for op in ops), spill_loads=sum(op.startswith("LDL") for op in ops),
        shared=int(shared), wgmma=sum(op.startswith("HGMMA") for op in ops),
        mma=sum(op.startswith("HMMA") for op in ops), instructions=len(ops),
        loop_instructions=_innermost_matmul_loop(instructions),
    )


def _signature(fn, pointers, floats, constexprs):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + _TRITON_DTYPE[str(pointers[name])]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as at run time
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                # Row strides of [T, H, D] tensors are multiples of 16 at the head dims we compile for; the
                # runtime specialises them the same way.
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_launch(fn, *, pointers, floats=(), constexprs, num_warps, num_stages, arch):
    """Compile one launch for ``sm_{arch}`` and report its resources. ``pointers`` maps pointer arguments to torch
    dtypes, ``floats`` names the fp32 scalar arguments; every other non-constexpr argument is an int32."""
    require_triton("compiling kernels ahead of time")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(fn, pointers, set(floats), constexprs)
    source = ASTSource(fn, signature, constexprs=dict(constexprs), attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(kernel.hash)
    cached = cache.get_file("llm2vec_fast_report.json")
    if cached:
        with open(cached) as f:
            return KernelReport(**json.load(f))
    report = report_from_cubin(fn.__name__, arch, kernel.asm["cubin"], kernel.metadata.shared)
    cache.put(json.dumps(dataclasses.asdict(report)), "llm2vec_fast_report.json", binary=False)
    return report


# --------------------------------------------------------------------------------------------------------------
# Every launch the host code can make
# --------------------------------------------------------------------------------------------------------------

ARCHS = (90, 80)
HEAD_DIMS = (64, 80, 128, 256)
GROUPS = (1, 3, 4)
KV_HEADS = 3  # SmolLM2's; HQ / HKV only enter index arithmetic, the group size shapes the dK/dV loop


@dataclasses.dataclass(frozen=True)
class Mask:
    """The attention's compile-time mask branches: causal, sliding window (0: none), soft-capped logits."""
    causal: bool = False
    window: int = 0
    softcap: bool = False

    @property
    def tag(self):
        """``""`` for plain bidirectional attention, else e.g. ``"-causal-w512-cap"``."""
        return (("-causal" if self.causal else "") + (f"-w{self.window}" if self.window else "")
                + ("-cap" if self.softcap else ""))


NO_MASK = Mask()
# Every branch on at once: the most code in the inner loops (Gemma 2 as a causal model; the band and the tanh).
ALL_MASKS = Mask(causal=True, window=512, softcap=True)
# Gemma 2 / 3 made bidirectional: a two-sided window, and Gemma 2's cap.
BIDIRECTIONAL_WINDOW = Mask(window=512, softcap=True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One launch to compile, with a readable id such as ``sm90-bf16-d128-g3-drop-bwd_dkdv`` (or
    ``sm90-bf16-d128-g3-drop-causal-w512-cap-bwd_dkdv`` with mask branches on)."""
    arch: int
    dtype: object
    head_dim: int
    group: int
    dropout: bool
    kernel: str
    launch: object
    mask: Mask = NO_MASK

    @property
    def id(self):
        dtype = _TRITON_DTYPE[str(self.dtype)]
        return (f"sm{self.arch}-{dtype}-d{self.head_dim}-g{self.group}-{'drop' if self.dropout else 'nodrop'}"
                f"{self.mask.tag}-{self.kernel}")

    def compile(self):
        launch = self.launch
        return compile_launch(launch.kernel, pointers=launch.pointers, floats=launch.floats,
                              constexprs=launch.constexprs, num_warps=launch.num_warps,
                              num_stages=launch.num_stages, arch=self.arch)


def attention_cases(archs=ARCHS, dtypes=None, head_dims=HEAD_DIMS, groups=GROUPS, dropouts=(False, True),
                    masks=(NO_MASK,)):
    """The attention launches for every combination, each distinct compilation once (the preprocess kernel
    depends only on dtype and head dim, so it appears once per pair, unmasked)."""
    import torch

    from . import attention

    dtypes = dtypes or (torch.bfloat16, torch.float16, torch.float32)
    seen = set()
    for arch in archs:
        for dtype in dtypes:
            for d in head_dims:
                for g in groups:
                    for dropout in dropouts:
                        for mask in masks:
                            yield from _cases_of(attention, arch, dtype, d, g, dropout, mask, seen)


def _cases_of(attention, arch, dtype, d, g, dropout, mask, seen):
    m = dict(causal=mask.causal, window=mask.window, softcap=mask.softcap)
    launches = attention.attention_launches(dtype, d, g * KV_HEADS, KV_HEADS, dropout, arch, **m)
    if g > 1 and arch >= 90 and attention.may_split_dkdv(dropout, mask.causal or mask.window > 0):
        # long sequences split the GQA group (attention.dkdv_split)
        launches["bwd_dkdv_split"] = attention.attention_launches(
            dtype, d, g * KV_HEADS, KV_HEADS, dropout, arch, dkdv_split=g, **m)["bwd_dkdv"]
    for name, launch in launches.items():
        key = (arch, name, str(dtype), tuple(sorted(launch.constexprs.items())), launch.num_warps,
               launch.num_stages)
        if key in seen or (name == "bwd_preprocess" and mask != NO_MASK):
            continue  # the preprocess kernel has no mask branches: its unmasked case covers it
        seen.add(key)
        yield Case(arch, dtype, d, g, dropout, name, launch, mask)


def every_case(archs=ARCHS):
    """``--all``: the whole product, unmasked and with every mask branch on (~900 compilations, ~40 min)."""
    return list(attention_cases(archs=archs, masks=(NO_MASK, ALL_MASKS)))


def representative_cases(archs=ARCHS):
    """The subset CI compiles (the full product of ``attention_cases`` is ~450 compilations, ~20 min on two
    cores): every dtype at head dim 128 with GQA group 3, dropout on and off; bf16 at head dims 64, 80 and 256
    (group 1, no dropout); and the SimCSE shape of the default model (bf16, head dim 64, group 3, dropout). The
    mask branches: all of them on (causal, window, softcap) in bf16 at head dim 128 (Qwen3's) with GQA group 3,
    dropout on and off, and at the SimCSE shape; Gemma's bidirectional window with softcap at head dim 256."""
    import torch

    seen, out = set(), []
    parts = [
        dict(head_dims=(128,), groups=(3,)),
        dict(dtypes=(torch.bfloat16,), head_dims=(64, 80, 256), groups=(1,), dropouts=(False,)),
        dict(dtypes=(torch.bfloat16,), head_dims=(64,), groups=(3,), dropouts=(True,)),
        dict(dtypes=(torch.bfloat16,), head_dims=(128,), groups=(3,), masks=(ALL_MASKS,)),
        dict(dtypes=(torch.bfloat16,), head_dims=(64,), groups=(3,), dropouts=(True,), masks=(ALL_MASKS,)),
        dict(dtypes=(torch.bfloat16,), head_dims=(256,), groups=(1,), dropouts=(False,),
             masks=(BIDIRECTIONAL_WINDOW,)),
    ]
    for part in parts:
        for case in attention_cases(archs=archs, **part):
            if case.id not in seen and (case.kernel != "bwd_preprocess" or case.id.split("-g")[0] not in seen):
                seen.add(case.id)
                out.append(case)
    return out


def compile_all(cases, workers=2):
    """{case.id: KernelReport} for ``cases``, compiled on ``workers`` threads (ptxas and the MLIR passes run
    outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((c.id for c in cases), pool.map(lambda c: c.compile(), cases)))


# --------------------------------------------------------------------------------------------------------------
# Tiling sweep: which candidate tilings spill, per kind of input
# --------------------------------------------------------------------------------------------------------------

# (BM, BN, warps, stages) per kernel, largest work per program first.
TILING_CANDIDATES = {
    "forward": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3),
                (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2)],
    "bwd_dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (32, 128, 4, 2), (16, 128, 8, 2), (64, 64, 4, 3),
                 (64, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 8, 1), (16, 64, 4, 2)],
    "bwd_dq": [(128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (128, 32, 4, 2), (64, 64, 4, 3),
               (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
}
_PREFIX = {"forward": "fwd", "bwd_dkdv": "dkdv", "bwd_dq": "dq"}


def sweep(archs=ARCHS, head_dims=(64, 128, 256), dtypes=None, dropouts=(False, True), group=3, workers=2):
    """[(arch, dtype, head_dim, dropout, kernel, (BM, BN, warps, stages), KernelReport)] for every candidate."""
    import torch

    from . import attention

    dtypes = dtypes or (torch.bfloat16, torch.float32)
    jobs = []
    previous = attention.CONFIG_OVERRIDE
    try:
        for arch in archs:
            for dtype in dtypes:
                for d in head_dims:
                    for dropout in dropouts:
                        for kernel, candidates in TILING_CANDIDATES.items():
                            for bm, bn, warps, stages in candidates:
                                p = _PREFIX[kernel]
                                attention.CONFIG_OVERRIDE = {f"{p}_bm": bm, f"{p}_bn": bn, f"{p}_warps": warps,
                                                             f"{p}_stages": stages}
                                launch = attention.attention_launches(dtype, d, group * KV_HEADS, KV_HEADS, dropout,
                                                                      arch)[kernel]
                                jobs.append(((arch, dtype, d, dropout, kernel, (bm, bn, warps, stages)),
                                             Case(arch, dtype, d, group, dropout, kernel, launch)))
    finally:
        attention.CONFIG_OVERRIDE = previous
    from concurrent.futures import ThreadPoolExecutor

    # Not compile_all: the candidates of one case share its id.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reports = list(pool.map(lambda job: job[1].compile(), jobs))
    return [(*key, report) for (key, _), report in zip(jobs, reports)]


# --------------------------------------------------------------------------------------------------------------
# Command line: the compile table
# --------------------------------------------------------------------------------------------------------------

_COLUMNS = ("registers", "stack", "spill_stores", "spill_loads", "shared", "wgmma", "mma", "instructions",
            "loop_instructions")


def table_rows(cases, reports):
    return [dict(id=c.id, num_warps=c.launch.num_warps, num_stages=c.launch.num_stages,
                 tiles={k: v for k, v in c.launch.constexprs.items() if k in ("BM", "BN", "BT")},
                 **dataclasses.asdict(reports[c.id])) for c in cases]


def format_table(rows):
    head = f"{'launch':<44} {'warps':>5} {'stg':>3} {'tiles':>9} " + " ".join(
        f"{h:>6}" for h in ("regs", "stack", "STL", "LDL", "shared", "wgmma", "mma", "sass", "loop"))
    lines = [head]
    for r in rows:
        tiles = "x".join(str(v) for v in r["tiles"].values())
        flags = ("  SPILL" if r["stack"] or r["spill_stores"] else "") + (
            "  SHARED>LIMIT" if r["shared"] > SHARED_LIMIT[r["arch"]] else "")
        lines.append(f"{r['id']:<44} {r['num_warps']:>5} {r['num_stages']:>3} {tiles:>9} "
                     + " ".join(f"{r[c]:>6}" for c in _COLUMNS) + flags)
    return "\n".join(lines)


def main(argv=None):
    import argparse
    import sys
    import time

    parser = argparse.ArgumentParser(
        prog="python -m llm2vec_fast.kernels.gpu_compile",
        description="Compile the attention kernels for sm_90 and sm_80 without a GPU; print registers, spills, "
                    "shared memory, tensor-core instructions and inner-loop sizes.")
    parser.add_argument("--all", action="store_true",
                        help="every launch, unmasked and with every mask branch on (~900 compilations, ~40 min "
                             "on 2 cores), not the subset CI compiles")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="target (default: both)")
    parser.add_argument("--ids", nargs="+", help="compile only these case ids (as the table prints them)")
    parser.add_argument("--workers", type=int, default=2, help="compile threads")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    parser.add_argument("--sweep", action="store_true",
                        help="compile every candidate tiling (TILING_CANDIDATES) instead")
    parser.add_argument("--head-dim", type=int, action="append", help="sweep these head dims (default 64 128 256)")
    parser.add_argument("--dtype", action="append", choices=("bf16", "fp32"), help="sweep these (default both)")
    parser.add_argument("--config-override", metavar="JSON",
                        help="tiling keys of attention_config to replace, e.g. '{\"fwd_bm\": 64}', to try a tiling")
    args = parser.parse_args(argv)
    if _interpreting():
        parser.error("TRITON_INTERPRET=1 makes the kernels interpreted functions, which cannot be compiled: unset it")
    if args.config_override:
        from . import attention

        attention.CONFIG_OVERRIDE = json.loads(args.config_override)
    archs = tuple(args.arch or ARCHS)
    if args.sweep:
        import torch

        dtypes = tuple({"bf16": torch.bfloat16, "fp32": torch.float32}[d] for d in args.dtype or ("bf16", "fp32"))
        return _print_sweep(sweep(archs=archs, head_dims=tuple(args.head_dim or (64, 128, 256)), dtypes=dtypes,
                                  workers=args.workers), args.json)
    cases = every_case(archs) if args.all else representative_cases(archs)
    if args.ids:
        cases = list({c.id: c for c in every_case(archs) + representative_cases(archs)}.values())
        unknown = set(args.ids) - {c.id for c in cases}
        if unknown:
            parser.error(f"unknown case ids {sorted(unknown)}; run without --ids to see them")
        cases = [c for c in cases if c.id in set(args.ids)]
    start = time.time()
    rows = table_rows(cases, compile_all(cases, workers=args.workers))
    if not args.quiet:
        print(format_table(rows))
    print(f"{len(rows)} launches compiled in {time.time() - start:.0f} s: "
          f"{sum(bool(r['stack'] or r['spill_stores']) for r in rows)} spill, "
          f"{sum(r['shared'] > SHARED_LIMIT[r['arch']] for r in rows)} exceed shared memory", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
            f.write("\n")


def _print_sweep(results, path):
    rows = []
    for arch, dtype, d, dropout, kernel, tiles, r in results:
        rows.append(dict(arch=arch, dtype=_TRITON_DTYPE[str(dtype)], head_dim=d, dropout=dropout, kernel=kernel,
                         tiles=list(tiles), **{c: getattr(r, c) for c in _COLUMNS}))
        print(f"sm{arch} {rows[-1]['dtype']:<4} d{d:<3} {'drop' if dropout else 'nodrop':<6} {kernel:<9} "
              f"{'x'.join(map(str, tiles[:2])):>8} w{tiles[2]} s{tiles[3]} regs {r.registers:>3} stack {r.stack:>5} "
              f"shared {r.shared:>6} loop {r.loop_instructions:>5}"
              f"{'  SPILL' if r.spills else ''}{'  SHARED>LIMIT' if not r.fits_shared else ''}")
    if path:
        with open(path, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
