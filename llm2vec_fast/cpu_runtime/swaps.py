"""How the CPU runtime swaps a Hugging Face module's forward, and where it keeps what it swapped.

All of it lives in one object per module, `ModuleRuntime`, at ``module.__dict__["_llm2vec_fast"]``: the forwards
it replaced (one per slot, so that the C++ ops and the prepared linears come and go independently), the prepared
GEMMs, and the per-module facts the swapped forwards read. Nothing else is set on Hugging Face modules.

A swapped module says so in `print(model)`, as Liger-Kernel's patches do: its name gains ``[llm2vec_fast]`` and its
extra_repr lists what runs instead, e.g. ``LlamaRMSNorm[llm2vec_fast]((64,), eps=1e-05; cpu: C++ rms_norm)``.

Forwards, names and reprs are bound with functools.partial rather than as bound methods: a bound method pickles as
getattr(module, its name), which the module being unpickled does not have yet, while a partial pickles the
module-level function by reference (and a deepcopy rebinds it to the copied module). Ray ships models by pickle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from torch import nn

ATTRIBUTE = "_llm2vec_fast"


@dataclasses.dataclass
class ModuleRuntime:
    """What the CPU runtime keeps on one module."""

    # slot ("native", "linear") -> (the replaced forward, whether it was an instance attribute)
    originals: dict = dataclasses.field(default_factory=dict)
    # slot -> what runs instead, for print(model)
    labels: dict = dataclasses.field(default_factory=dict)
    # prepared GEMMs: "linear" (this nn.Linear's), "qkv" / "gate_up" (fused groups owned by an attention / MLP)
    plans: dict = dataclasses.field(default_factory=dict)
    gemma_norm: Optional[bool] = None  # an RMSNorm the native ops know: scale by (1 + weight) (Gemma) or weight
    native_attention: bool = False  # the attention module's packed calls may take the C++ varlen attention

    def empty(self) -> bool:
        return not (self.originals or self.labels or self.plans or self.gemma_norm is not None
                    or self.native_attention)


def state(module: nn.Module) -> Optional[ModuleRuntime]:
    """The module's ModuleRuntime, or None when the runtime never touched it."""
    return module.__dict__.get(ATTRIBUTE)


def ensure_state(module: nn.Module) -> ModuleRuntime:
    found = module.__dict__.get(ATTRIBUTE)
    if found is None:
        found = module.__dict__[ATTRIBUTE] = ModuleRuntime()
        # Named and described by the runtime from now on (see the module docstring).
        module.__dict__["_get_name"] = functools.partial(_swapped_name, module)
        module.__dict__["extra_repr"] = functools.partial(_swapped_extra_repr, module)
    return found


def release(module: nn.Module) -> None:
    """Drop the module's ModuleRuntime once nothing is left in it: the module is then plain Hugging Face again."""
    found = module.__dict__.get(ATTRIBUTE)
    if found is not None and found.empty():
        for key in (ATTRIBUTE, "_get_name", "extra_repr"):
            module.__dict__.pop(key, None)


def _swapped_name(module: nn.Module) -> str:
    return f"{type(module).__name__}[llm2vec_fast]"


def _swapped_extra_repr(module: nn.Module) -> str:
    own = type(module).extra_repr(module)
    found = state(module)
    parts = [label for label in found.labels.values() if label] if found is not None else []
    if found is not None:
        parts += describe_plans(found.plans)
    if not parts:
        return own
    return f"{own}; cpu: {', '.join(parts)}" if own else f"cpu: {', '.join(parts)}"


def describe_plan(plan) -> str:
    """A prepared GEMM (`cpu_linear.CpuLinear`) in a few words: its dtype and, once measured, its backend."""
    dtype = str(plan.matmul_dtype).replace("torch.", "")
    return f"prepared {dtype} GEMM" + (f" ({plan.backend})" if plan.backend else "")


def describe_plans(plans: dict) -> list:
    """A module's prepared GEMMs: its own ("linear") and the fused groups it owns ("qkv: ...")."""
    return [describe_plan(plan) if name == "linear" else f"{name}: {describe_plan(plan)}"
            for name, plan in plans.items()]


def swap_forward(module: nn.Module, forward: Callable, slot: str, label: str) -> bool:
    """Replace module.forward by partial(forward, module), keeping the replaced one for the swapped forward to fall
    back to (`original`). False when the slot is already swapped."""
    runtime = ensure_state(module)
    if slot in runtime.originals:
        return False
    had_instance_forward = "forward" in module.__dict__
    replaced = module.forward if had_instance_forward else functools.partial(type(module).forward, module)
    runtime.originals[slot] = (replaced, had_instance_forward)
    runtime.labels[slot] = label
    module.forward = functools.partial(forward, module)
    return True


def original(module: nn.Module, slot: str) -> Callable:
    """The forward `swap_forward` replaced in `slot`."""
    return module.__dict__[ATTRIBUTE].originals[slot][0]


def is_swapped(module: nn.Module, slot: str) -> bool:
    found = state(module)
    return found is not None and slot in found.originals


def restore_forward(module: nn.Module, slot: str) -> None:
    """Undo `swap_forward` in `slot` (nothing when it is not swapped)."""
    found = state(module)
    if found is None or slot not in found.originals:
        return
    replaced, had_instance_forward = found.originals.pop(slot)
    found.labels.pop(slot, None)
    if had_instance_forward:
        module.forward = replaced
    else:
        del module.forward
    release(module)
