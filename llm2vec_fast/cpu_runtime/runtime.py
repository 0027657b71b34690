"""`CpuRuntime`: what a model's CPU inference runs instead of Hugging Face's PyTorch code, as one object.

A patched model gets one CpuRuntime, kept on its decoder (``decoder.__dict__["_llm2vec_fast_runtime"]``), the first
time it encodes on CPU. It owns two independent swaps, each of which can be turned on, changed or off again:

- the C++ ops of csrc/ (`use_native_ops`): RMSNorm, the decoder layer's residual add fused into its second norm,
  the SwiGLU product, the rotary embedding, the varlen attention, and the whole packed attention block;
- prepared GEMMs (`use_prepared_linears`): the decoder layers' linears with weights prepared once
  (`cpu_linear.CpuLinear`), q/k/v and gate/up fused into one GEMM where measuring says it pays, and the mixed
  mode (bf16 GEMMs of a float32 model).

The swapped forwards (`forwards.py`) fall back to the replaced ones for anything but CPU inference, so a model
with a runtime trains and runs on GPU exactly as before. Which forwards are swapped shows in `print(model)`
(`swaps.py`) and in `CpuRuntime.swapped(model)`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import native
from ..batching import check_positive_int
from . import forwards, rotary, swaps

ATTRIBUTE = "_llm2vec_fast_runtime"
# Native ops the runtime can swap in. "add_rms_norm" is the decoder layer's residual add fused into its
# post-attention RMSNorm (a swapped decoder-layer forward).
NATIVE_OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul", "varlen_attention", "attention_block")
# The ones that beat their PyTorch counterpart in benchmarks/bench_native.py (results/native_cpu.json): the
# default set. An op that does not win there is not wired in.
SHIPPED_NATIVE_OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul", "varlen_attention", "attention_block")
_SILU_NAMES = ("SiLU", "SiLUActivation")  # Gemma's GELU-tanh MLPs and Phi-3's fused gate_up keep HF's forward
# The decoder layer `forwards.decoder_layer_forward` reimplements: exactly these submodules. Gemma 2 / 3 (four norms)
# and Phi-3 (residual dropouts) keep Hugging Face's layer forward around the swapped blocks.
_PLAIN_LAYER = {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
# Linears that read one input, fused into one GEMM when measuring says it pays: (plan name, member attributes).
FUSED_GROUPS = (("qkv", ("q_proj", "k_proj", "v_proj")), ("gate_up", ("gate_proj", "up_proj")))


def _is_attention(module) -> bool:
    return hasattr(module, "is_causal") and hasattr(module, "layer_idx")


class CpuRuntime:
    """The CPU runtime of one decoder (the base model inside a task model or a PEFT wrapper)."""

    def __init__(self):
        self.native_ops: Optional[tuple] = None  # None: never configured; () off
        self.linears: Optional[dict] = None  # the summary of the prepared GEMMs; None: never configured; {} off
        self.rotary_family: Optional[str] = None  # the family whose apply_rotary_pos_emb this model holds
        self.prepared_dtype = "never"  # the matmul_dtype `prepare` last set the linears up for

    def __repr__(self) -> str:
        return f"CpuRuntime(native_ops={self.native_ops}, linears={self.linears})"

    # --------------------------------------------------------------------------------------------- the C++ ops

    def use_native_ops(self, decoder, enable: bool = True, ops=None) -> tuple:
        """See `use_native_cpu_ops`."""
        self._disable_native(decoder)
        if not enable:
            self.native_ops = ()
            return ()
        wanted = tuple(SHIPPED_NATIVE_OPS if ops is None else ops)
        unknown = set(wanted) - set(NATIVE_OPS)
        if unknown:
            raise ValueError(f"unknown native ops {sorted(unknown)}; choose from {', '.join(NATIVE_OPS)}")
        if native.load() is None:
            self.native_ops = ()
            return ()
        from ..modeling import family_of  # modeling imports this package

        gemma = family_of(decoder.config).gemma_norm
        applied = set()
        for module in decoder.modules():
            name = type(module).__name__
            if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor):
                swaps.ensure_state(module).gemma_norm = gemma
                if "rms_norm" in wanted:
                    swaps.swap_forward(module, forwards.rms_norm_forward, "native", "C++ rms_norm")
                    applied.add("rms_norm")
            elif name.endswith("MLP") and "silu_mul" in wanted and \
                    type(getattr(module, "act_fn", None)).__name__ in _SILU_NAMES and hasattr(module, "gate_proj"):
                swaps.swap_forward(module, forwards.mlp_forward, "native", "C++ silu_mul")
                applied.add("silu_mul")
            elif name.endswith("DecoderLayer") and "add_rms_norm" in wanted and \
                    {child for child, _ in module.named_children()} == _PLAIN_LAYER:
                swaps.swap_forward(module, forwards.decoder_layer_forward, "native", "C++ residual add + rms_norm")
                applied.add("add_rms_norm")
            if _is_attention(module) and "varlen_attention" in wanted:
                swaps.ensure_state(module).native_attention = True
                applied.add("varlen_attention")
                if "attention_block" in wanted and "rotary" in wanted and \
                        all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")):
                    # The whole packed attention block: fused q/k/v and the C++ rotary without HF's [B, H, T, D]
                    # transposes (a `rotary` request alone keeps HF's block with the swapped apply_rotary_pos_emb).
                    swaps.swap_forward(module, forwards.attention_forward, "native",
                                       "C++ attention block (rotary + varlen attention)")
                    applied.add("attention_block")
                else:
                    swaps.ensure_state(module).labels["attention"] = "C++ varlen attention"
        family = rotary.family_module(decoder)
        if "rotary" in wanted and family is not None:
            rotary.acquire(family)
            self.rotary_family = family.__name__
            applied.add("rotary")
        self.native_ops = tuple(op for op in NATIVE_OPS if op in applied)
        return self.native_ops

    def _disable_native(self, decoder) -> None:
        for module in decoder.modules():
            swaps.restore_forward(module, "native")
            found = swaps.state(module)
            if found is not None:
                found.gemma_norm, found.native_attention = None, False
                found.labels.pop("attention", None)
                swaps.release(module)
        if self.rotary_family is not None:
            rotary.release(self.rotary_family)
            self.rotary_family = None

    # ------------------------------------------------------------------------------------- the prepared GEMMs

    def use_prepared_linears(self, decoder, enable: bool = True, matmul_dtype=None, tokens: int = 1024, fuse=None,
                             backend=None) -> dict:
        """See `use_cpu_linears`."""
        from ..cpu_linear import CpuLinear, fuse_pays

        for module in decoder.modules():
            swaps.restore_forward(module, "linear")
            found = swaps.state(module)
            if found is not None:
                found.plans.clear()
                swaps.release(module)
        self.linears = None
        if not enable:
            self.linears = {}
            return {}
        if matmul_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"matmul_dtype must be None, torch.float32 or torch.bfloat16, got {matmul_dtype!r}")
        check_positive_int("tokens", tokens)
        layers = [m for m in decoder.modules() if type(m).__name__.endswith("DecoderLayer")]
        summary = {"matmul_dtype": None, "backends": {}, "fused": []}
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    plan = CpuLinear([module], matmul_dtype, tokens, backend)
                    swaps.swap_forward(module, forwards.linear_forward, "linear", "")
                    swaps.state(module).plans["linear"] = plan
                    summary["matmul_dtype"] = str(plan.matmul_dtype).replace("torch.", "")
            for owner in layer.modules():
                for plan_name, names in FUSED_GROUPS:
                    members = [getattr(owner, n, None) for n in names]
                    if not all(isinstance(m, torch.nn.Linear) for m in members):
                        continue
                    if len({(m.in_features, m.weight.dtype) for m in members}) != 1:
                        continue
                    dtype = matmul_dtype or members[0].weight.dtype
                    wanted = fuse if fuse is not None else fuse_pays(members[0].in_features,
                                                                     [m.out_features for m in members], dtype, tokens)
                    if wanted:
                        swaps.ensure_state(owner).plans[plan_name] = CpuLinear(members, matmul_dtype, tokens, backend)
                        label = "+".join(names)
                        if label not in summary["fused"]:
                            summary["fused"].append(label)
        for layer in layers[:1]:  # measure and prepare one layer's shapes now, so the summary names the backends
            for module in layer.modules():
                found = swaps.state(module)
                for plan in (found.plans.values() if found is not None else ()):
                    plan.prepare()
                    summary["backends"][f"{plan.in_features}x{sum(plan.splits)}"] = plan.backend
        self.linears = summary
        return summary

    # ------------------------------------------------------------------------------------------------ encode

    def prepare(self, decoder, matmul_dtype, tokens: int) -> None:
        """What a CPU encode sets up: the native ops once per model (an explicit `use_native_cpu_ops(..., False)`
        stays), and the prepared GEMMs once, and again when the encoder's matmul_dtype changed since this method
        set them up (an explicit `use_cpu_linears(...)` call, enable=False included, is otherwise left alone)."""
        if self.native_ops is None:
            self.use_native_ops(decoder)
        if self.linears is None or (self.prepared_dtype != "never" and self.prepared_dtype != matmul_dtype):
            self.prepared_dtype = matmul_dtype
            self.use_prepared_linears(decoder, matmul_dtype=matmul_dtype, tokens=tokens)

    @staticmethod
    def swapped(decoder) -> dict:
        """{module name: what runs instead} for every module whose CPU inference the runtime changed."""
        result = {}
        for name, module in decoder.named_modules():
            found = swaps.state(module)
            if found is None:
                continue
            parts = [label for label in found.labels.values() if label]
            parts += swaps.describe_plans(found.plans)
            if parts:
                result[name] = ", ".join(parts)
        return result


def runtime_of(decoder, create: bool = False) -> Optional[CpuRuntime]:
    """The decoder's CpuRuntime (created when `create`), or None."""
    found = decoder.__dict__.get(ATTRIBUTE)
    if found is None and create:
        found = decoder.__dict__[ATTRIBUTE] = CpuRuntime()
    return found
