"""CPU inference linears: weights prepared once, the GEMM backend chosen per shape by measuring it here.

A `CpuLinear` stands for one nn.Linear or several that read the same input (q/k/v, gate/up), fused along the
output dim into one GEMM. Its weight is prepared once: concatenated, cast to the matmul dtype (bfloat16 for the
mixed mode of an fp32 model) and, when oneDNN wins on this machine, packed into oneDNN's blocked layout with
``torch.ops.mkldnn._reorder_linear_weight`` and run with ``torch.ops.mkldnn._linear_pointwise`` (what inductor's
freezing does). The prepared copy is rebuilt when a source weight changes (its version counter or storage), so a
training step between two encodes is never served stale weights.

Which backend, and whether fusing pays, is not assumed: `gemm_seconds` times both on random inputs of the real
shape the first time a shape is seen in a process (a few ms each), and `backend_for` / `fuse_pays` decide from that.
`ENV_BACKEND` (``LLM2VEC_FAST_CPU_GEMM=torch|onednn``) forces a backend.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import settings

BACKENDS = ("torch", "onednn")
ENV_BACKEND = "LLM2VEC_FAST_CPU_GEMM"
# A backend or a fusion must beat the plain path by this factor to be chosen: below it the difference is noise on
# a shared machine and the plain path is the safer one.
MARGIN = 0.95

_lock = threading.Lock()
_timings: dict = {}  # (K, N, dtype, tokens, threads, backend) -> seconds per GEMM


def onednn_available() -> bool:
    """True when this torch build has the oneDNN (mkldnn) linear ops inductor uses."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def forced_backend() -> Optional[str]:
    """The backend LLM2VEC_FAST_CPU_GEMM forces (`settings`), or None; a value that is not a backend raises
    ValueError."""
    value = settings.current().cpu_gemm
    return None if value == "auto" else value


def pack_weight(weight: torch.Tensor, backend: str, tokens: int) -> torch.Tensor:
    """`weight` [N, K] (contiguous, the matmul dtype) in the layout `backend` reads; tokens: the expected rows."""
    if backend == "onednn":
        return torch.ops.mkldnn._reorder_linear_weight(weight, tokens)
    return weight


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """x [M, K] @ weight^T (+ bias) -> [M, N], `weight` as `pack_weight` returned it for `backend`."""
    if backend == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gemm_seconds(K: int, N: int, dtype: torch.dtype, tokens: int, backend: str, repeats: int = 7) -> float:
    """Seconds per [tokens, K] x [K, N] GEMM through `backend` on this machine: the fastest of `repeats` calls
    after a warm-up, every available backend timed in the same loop, call for call, so that both see the same load
    on a shared machine. Measured once per process and shape, then cached."""
    key = (K, N, dtype, tokens, torch.get_num_threads())
    with _lock:
        if key + (backend,) in _timings:
            return _timings[key + (backend,)]
    backends = [b for b in BACKENDS if b == "torch" or onednn_available()]
    if backend not in backends:
        backends.append(backend)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, K, generator=generator).to(dtype)
    weight = (torch.randn(N, K, generator=generator) * K ** -0.5).to(dtype)
    packed = {b: pack_weight(weight, b, tokens) for b in backends}
    best = {b: float("inf") for b in backends}
    with torch.inference_mode():
        for b in backends:
            gemm(x, packed[b], None, b)
        for _ in range(repeats):
            for b in backends:
                start = time.perf_counter()
                gemm(x, packed[b], None, b)
                best[b] = min(best[b], time.perf_counter() - start)
    with _lock:
        for b, seconds in best.items():
            _timings.setdefault(key + (b,), seconds)
        return _timings[key + (backend,)]


def backend_for(K: int, N: int, dtype: torch.dtype, tokens: int) -> str:
    """The faster backend for this GEMM shape here: oneDNN only if it measures faster than torch by MARGIN."""
    forced = forced_backend()
    if forced == "onednn" and not onednn_available():
        raise RuntimeError(f"{ENV_BACKEND}=onednn but this torch build has no oneDNN linear ops")
    if forced is not None:
        return forced
    if not onednn_available():
        return "torch"
    torch_time = gemm_seconds(K, N, dtype, tokens, "torch")
    return "onednn" if gemm_seconds(K, N, dtype, tokens, "onednn") < MARGIN * torch_time else "torch"


def best_seconds(K: int, N: int, dtype: torch.dtype, tokens: int) -> float:
    """Seconds per GEMM through `backend_for`'s choice."""
    return gemm_seconds(K, N, dtype, tokens, backend_for(K, N, dtype, tokens))


def fuse_pays(K: int, parts: Sequence[int], dtype: torch.dtype, tokens: int) -> bool:
    """Whether one [K, sum(parts)] GEMM measures faster than one GEMM per part (by MARGIN)."""
    if len(parts) < 2:
        return False
    separate = sum(best_seconds(K, n, dtype, tokens) for n in parts)
    return best_seconds(K, sum(parts), dtype, tokens) < MARGIN * separate


class CpuLinear:
    """The prepared GEMM of `linears` (nn.Linear modules with one in_features), fused along the output dim.

    matmul_dtype: the dtype the GEMM runs in (default: the weights', whatever they are cast to later). tokens: the rows a call is expected to have
    (the encode's token budget), the shape the backend is measured at. backend: force "torch" or "onednn"
    (default: measured). Calling it with x [..., K] returns [..., sum of out_features] in matmul_dtype; `split`
    cuts that into one view per linear.
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], matmul_dtype: Optional[torch.dtype] = None,
                 tokens: int = 1024, backend: Optional[str] = None):
        linears = list(linears)
        if not linears:
            raise ValueError("CpuLinear needs at least one nn.Linear")
        in_features = {linear.in_features for linear in linears}
        if len(in_features) != 1:
            raise ValueError(f"fused linears must share in_features, got {sorted(in_features)}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.linears = linears
        self.in_features = in_features.pop()
        self.splits = [linear.out_features for linear in linears]
        self.requested_dtype = matmul_dtype
        self.tokens = tokens
        self.requested_backend = backend
        self.backend = None
        self._weight = self._bias = self._source = None
        self._prepare_lock = threading.Lock()

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The GEMM's dtype: the one asked for, else the weights' (followed when the model is cast)."""
        return self.requested_dtype or self.linears[0].weight.dtype

    def __getstate__(self):
        # Copies and pickles re-prepare on first use: locks do not pickle, and the prepared weight is derived data.
        state = dict(self.__dict__)
        state.update(_weight=None, _bias=None, _source=None, backend=None, _prepare_lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._prepare_lock = threading.Lock()

    def _source_state(self) -> tuple:
        return tuple((linear.weight.data_ptr(), linear.weight._version, linear.weight.dtype,
                      None if linear.bias is None else (linear.bias.data_ptr(), linear.bias._version))
                     for linear in self.linears)

    def prepare(self) -> None:
        """(Re)build the prepared weight if a source weight changed since the last call."""
        state = self._source_state()
        if state == self._source:
            return
        with self._prepare_lock:
            if state == self._source:
                return
            with torch.no_grad():
                weight = torch.cat([linear.weight.detach() for linear in self.linears]).to(self.matmul_dtype)
                weight = weight.contiguous()
                bias = None
                if any(linear.bias is not None for linear in self.linears):
                    bias = torch.cat([linear.bias.detach() if linear.bias is not None else
                                      torch.zeros(linear.out_features, dtype=linear.weight.dtype)
                                      for linear in self.linears]).to(self.matmul_dtype).contiguous()
            backend = self.requested_backend or backend_for(self.in_features, weight.shape[0], self.matmul_dtype,
                                                            self.tokens)
            if backend == "torch" and len(self.linears) == 1 and self.matmul_dtype == self.linears[0].weight.dtype:
                weight = self.linears[0].weight.detach()  # nothing to prepare: no copy
                bias = None if self.linears[0].bias is None else self.linears[0].bias.detach()
            self._weight, self._bias = pack_weight(weight, backend, self.tokens), bias
            self.backend = backend
            self._source = state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.matmul_dtype)
        if x2.stride(-1) != 1 or (self.backend == "onednn" and not x2.is_contiguous()):
            x2 = x2.contiguous()
        y = gemm(x2, self._weight, self._bias, self.backend)
        return y.view(*shape[:-1], y.shape[-1])

    def split(self, y: torch.Tensor) -> tuple:
        """One view of `y` (a call's output) per linear, in the order given."""
        return tuple(y.split(self.splits, dim=-1))


# --------------------------------------------------------------------------------------- dtype="auto" on CPU

# bf16 GEMMs must beat fp32 GEMMs by this factor for auto to leave fp32: the mixed mode spends some of the gain on
# conversions and fp32 elementwise work.
BF16_MIN_SPEEDUP = 1.3
_CHOICE_FILE = "cpu_dtype.json"
ENV_DTYPE = "LLM2VEC_FAST_CPU_DTYPE"  # float32 | bfloat16 | mixed: what dtype="auto" resolves to, unmeasured
_announced: set = set()
_quiet = False  # see quiet_dtype_announcement


def cpu_flags() -> set:
    """The CPU feature flags /proc/cpuinfo lists (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_matmul(flags: Optional[set] = None) -> bool:
    """True when the CPU multiplies bf16 natively: AVX-512 BF16 or AMX-BF16 (from `flags`, default /proc/cpuinfo,
    else what torch detects)."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _machine_key(K: int, N: int, tokens: int) -> str:
    import platform

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    bf16 = sorted({"avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    return (f"{model or platform.processor() or platform.machine()}|{','.join(bf16)}|torch {torch.__version__}|"
            f"threads {torch.get_num_threads()}|{K}x{N}x{tokens}")


def _choice_path() -> str:
    return os.path.join(settings.current().cache_dir, _CHOICE_FILE)


def _read_choices() -> dict:
    import json

    try:
        with open(_choice_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_choice(key: str, value: dict) -> None:
    import json

    from .files import write_atomic

    data = _read_choices()
    data[key] = value
    try:
        os.makedirs(os.path.dirname(_choice_path()), mode=0o700, exist_ok=True)  # private: see native.py
        write_atomic(_choice_path(), json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def measure_bf16_speedup(K: int, N: int, tokens: int = 1024) -> float:
    """fp32 GEMM time / bf16 GEMM time at [tokens, K] x [K, N], each through its faster backend here."""
    return best_seconds(K, N, torch.float32, tokens) / best_seconds(K, N, torch.bfloat16, tokens)


def choose_cpu_dtype(hidden_size: int, intermediate_size: int, tokens: int = 1024, flags: Optional[set] = None,
                     use_cache: bool = True) -> tuple:
    """What dtype="auto" means on this CPU for a model of these sizes: ("mixed" | "float32", reason).

    Without native bf16 matmul it is float32 without measuring. With it, a [tokens, hidden] x [hidden,
    intermediate] GEMM is timed in both dtypes (the MLP's shape, most of the FLOPs); mixed where bf16 is at least
    BF16_MIN_SPEEDUP faster, float32 otherwise. The measurement is cached per machine, torch version, thread count
    and shape in <cache>/cpu_dtype.json (delete it to measure again). LLM2VEC_FAST_CPU_DTYPE fixes the answer.
    """
    forced = settings.current().cpu_dtype
    if forced:
        return forced, f"set by {ENV_DTYPE}"
    if not native_bf16_matmul(flags):
        return "float32", "no native bf16 matmul (AVX-512 BF16 / AMX) on this CPU"
    key = _machine_key(hidden_size, intermediate_size, tokens)
    cached = _read_choices().get(key) if use_cache else None
    speedup = cached.get("bf16_speedup") if isinstance(cached, dict) else None
    if not isinstance(speedup, (int, float)):
        speedup = measure_bf16_speedup(hidden_size, intermediate_size, tokens)
        if use_cache:
            _write_choice(key, {"bf16_speedup": round(speedup, 3), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    how = f"bf16 GEMM measured {speedup:.2f}x fp32 at {tokens}x{hidden_size}x{intermediate_size}"
    if speedup >= BF16_MIN_SPEEDUP:
        return "mixed", how
    return "float32", how + f" (< {BF16_MIN_SPEEDUP}x)"


def announce_cpu_dtype(choice: str, reason: str) -> None:
    """Print the auto choice on stderr in one short line, once per process and choice, unless
    `quiet_dtype_announcement` was called (the command line does so for an output that records it already)."""
    import sys

    if _quiet or (choice, reason) in _announced:
        return
    _announced.add((choice, reason))
    print(f"llm2vec-fast: dtype='auto' on this CPU -> {choice}: {reason}", file=sys.stderr)


@contextlib.contextmanager
def quiet_dtype_announcement():
    """Context manager: no `announce_cpu_dtype` line inside it. `llm2vec-fast encode` prints the line once per
    output directory: an output that records its dtype already had it."""
    global _quiet
    previous, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = previous
