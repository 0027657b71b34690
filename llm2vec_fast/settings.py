"""Every setting llm2vec-fast reads from the environment, in one place.

`current()` reads the ``LLM2VEC_FAST_*`` variables (and the torchrun rank variables, see `Ranks`) into a frozen
`Settings` and validates them, each call: code asks for the value where it decides, and passes it down as an
argument (the C++ ops get theirs as arguments too, never through ``getenv``). Tests change settings with the
``settings`` fixture of tests/conftest.py, which sets the variables, never module globals.

| variable | values | what it decides |
| --- | --- | --- |
| LLM2VEC_FAST_CACHE | a folder | the cache (converted default model, C++ builds, measured CPU choices) |
| LLM2VEC_FAST_NATIVE | 1 (default) / 0 | the C++ CPU ops; 0 keeps every op on its PyTorch path |
| LLM2VEC_FAST_CPU_ATTENTION | auto (default) / brgemm / portable | the C++ attention kernel |
| LLM2VEC_FAST_CPU_GEMM | auto (default) / torch / onednn | the backend of the prepared CPU GEMMs |
| LLM2VEC_FAST_CPU_DTYPE | unset / float32 / bfloat16 / mixed | what ``dtype="auto"`` resolves to on CPU, without measuring |
| LLM2VEC_FAST_ATTENTION_FP32 | tf32 (default) / tf32x3 / ieee | fp32 inputs of the GPU attention kernel |
| LLM2VEC_FAST_FAULT | a fault spec (llm2vec_fast/faults.py) | test-only fault injection: where to kill the process |

``LLM2VEC_FAST_BUILD_CPP=1`` is a build-time switch of setup.py (it runs before the package can be imported).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

CPU_ATTENTION_KERNELS = ("auto", "brgemm", "portable")
CPU_GEMM_BACKENDS = ("auto", "torch", "onednn")
# What dtype="auto" can resolve to on CPU: float32, pure bfloat16, or the mixed mode (an fp32 model whose matmuls
# run in bf16).
CPU_DTYPES = ("float32", "bfloat16", "mixed")
FP32_ATTENTION_PRECISIONS = ("tf32", "tf32x3", "ieee")
_FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    cache_dir: str
    native: bool = True
    cpu_attention: str = "auto"
    cpu_gemm: str = "auto"
    cpu_dtype: Optional[str] = None
    attention_fp32: str = "tf32"
    fault: Optional[str] = None


def _choice(name: str, allowed: tuple, default: Optional[str]) -> Optional[str]:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)} (or unset it)")
    return value


def _cache_dir() -> str:
    root = os.environ.get("LLM2VEC_FAST_CACHE")
    if root:
        return root
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm2vec_fast")


def current() -> Settings:
    """The settings in force now; a variable with a value it does not take raises ValueError naming it."""
    return Settings(
        cache_dir=_cache_dir(),
        native=os.environ.get("LLM2VEC_FAST_NATIVE", "1").strip().lower() not in _FALSE,
        cpu_attention=_choice("LLM2VEC_FAST_CPU_ATTENTION", CPU_ATTENTION_KERNELS, "auto"),
        cpu_gemm=_choice("LLM2VEC_FAST_CPU_GEMM", CPU_GEMM_BACKENDS, "auto"),
        cpu_dtype=_choice("LLM2VEC_FAST_CPU_DTYPE", CPU_DTYPES, None),
        attention_fp32=_choice("LLM2VEC_FAST_ATTENTION_FP32", FP32_ATTENTION_PRECISIONS, "tf32"),
        fault=os.environ.get("LLM2VEC_FAST_FAULT") or None,
    )


@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job: rank, world size and local rank (1 process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """From torchrun's RANK, WORLD_SIZE and LOCAL_RANK (LOCAL_RANK defaults to RANK); malformed or
        inconsistent values raise ValueError naming them."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as error:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({error}); launch with torchrun, "
                             f"or unset them for a single process") from None
        if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size} (LOCAL_RANK={local_rank}); launch "
                             f"with torchrun, or unset them for a single process")
        return cls(rank=rank, world_size=world_size, local_rank=local_rank)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0
