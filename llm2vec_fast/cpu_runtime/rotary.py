"""The C++ rotary embedding in place of a model family's `apply_rotary_pos_emb`.

Hugging Face attention blocks call their family module's global `apply_rotary_pos_emb`, so this swap is process
wide: the family's function is replaced while at least one model of the family uses the native ops, and put back
when the last one stops (a count per family). The replacement takes the C++ op only for the packed encode layout
on CPU with nothing to differentiate, and calls the original for everything else, so other models of the family
in the process compute exactly what they did. The swapped attention block (`forwards.attention_forward`) calls
the C++ rotary itself; this swap serves the calls that still go through Hugging Face's block.
"""

from __future__ import annotations

import sys

import torch

from .. import backends, cpu_ops

_users: dict = {}  # family module name -> (original apply_rotary_pos_emb, number of models using the swap)


def family_module(model):
    """The python module of the model's family (where its apply_rotary_pos_emb lives), or None."""
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "layer_idx"):
            family = sys.modules.get(type(module).__module__)
            return family if family is not None and hasattr(family, "apply_rotary_pos_emb") else None
    return None


def acquire(family) -> None:
    """One more model of `family` uses the native rotary."""
    original, users = _users.get(family.__name__, (family.apply_rotary_pos_emb, 0))
    if users == 0:
        family.apply_rotary_pos_emb = _native_rotary(original)
    _users[family.__name__] = (original, users + 1)


def release(family_name: str) -> None:
    """One model of the family stopped using it; the last one puts the original back."""
    if family_name not in _users:
        return
    original, users = _users[family_name]
    if users <= 1:
        sys.modules[family_name].apply_rotary_pos_emb = original
        del _users[family_name]
    else:
        _users[family_name] = (original, users - 1)


def _native_rotary(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        # Packed encode layout: q [1, Hq, T, D] and k [1, Hkv, T, D] (views of [1, T, H, D]), cos / sin [1, T, D].
        # (cos narrower than the head: a partial rotary embedding, Phi-4-mini's, which the C++ op does not do)
        if (unsqueeze_dim != 1 or q.dim() != 4 or q.shape[0] != 1 or cos.dim() != 3 or cos.shape[0] != 1
                or cos.shape[-1] != q.shape[-1]
                or backends.choose("rotary", q, k, cos, sin).name != "cpp"):
            return original(q, k, cos, sin, unsqueeze_dim)
        q_out, k_out = cpu_ops.rotary(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0])
        return q_out.transpose(0, 1).unsqueeze(0), k_out.transpose(0, 1).unsqueeze(0)

    if not isinstance(original, torch.nn.Module):
        apply_rotary_pos_emb.original = original
        return apply_rotary_pos_emb

    # transformers >= 5.25 with Hugging Face's `kernels` installed makes the family's apply_rotary_pos_emb a module
    # (kernels' Func), and unpickles each model's private copy of it as `type(<the family's global>)()`: the
    # replacement must be of that type, or a model that ran the native ops no longer pickles (Ray ships models so).
    class NativeRotary(type(original)):
        def forward(self, *args, **kwargs):
            return apply_rotary_pos_emb(*args, **kwargs)

    replacement = NativeRotary()
    replacement.__dict__["original"] = original  # a reference, not a registered submodule
    return replacement
