"""Chunked fused linear + cross-entropy: ``mean_i CE(hidden_i @ weight^T, labels_i)`` without full logits.

MNTP scores ~20% of the tokens against a vocabulary of 50k-128k entries; materialising the logits of every scored
row (and their gradient) dominates training memory. Here the rows are processed in chunks: for each chunk the
logits ``[C, V]`` are computed in fp32, turned *in place* into their gradient ``softmax - onehot`` (a Triton
kernel on GPU, two PyTorch ops on CPU), and immediately contracted into ``d hidden = g @ W`` and
``d weight += g^T @ h``. The forward therefore already holds both gradients; backward only scales them by the
incoming gradient. Peak extra memory: one ``[C, V]`` fp32 chunk.

Rows whose label equals ``ignore_index`` contribute nothing; the mean is over the other rows (as
``torch.nn.functional.cross_entropy``).
"""

import os

import torch

from ._triton import HAS_TRITON, require_triton, tl, triton

IGNORE_INDEX = -100
# Rows per chunk: big enough that the two matmuls per chunk run at full speed, small enough that the fp32
# [C, V] chunk stays a fraction of what full logits would cost (C=4096, V=128k: 2 GiB vs 8 GiB at 16k rows).
DEFAULT_CHUNK_ROWS = 4096

# Tests set this to True: outputs are then allocated NaN-filled, so an element never written fails loudly.
POISON_OUTPUTS = False


def _alloc(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# The kernels exist only where Triton is installed (the gpu extra); the CPU paths below never need them.
if HAS_TRITON:

    @triton.jit(do_not_specialize=["V"])
    def _cross_entropy_grad_kernel(logits, labels, loss, scale, stride_l, V, IGNORE: tl.constexpr, BV: tl.constexpr):
        # One program per row: log-sum-exp over the row in blocks (online max), the row's loss, then the row is
        # overwritten with its gradient scale * (softmax - onehot(label)).
        i_r = tl.program_id(0).to(tl.int64)
        p_row = logits + i_r * stride_l
        label = tl.load(labels + i_r).to(tl.int64)
        o_v = tl.arange(0, BV)
        b_m = -float("inf")
        b_s = 0.0
        for v0 in range(0, V, BV):
            m_v = (v0 + o_v) < V
            b_x = tl.load(p_row + v0 + o_v, mask=m_v, other=-float("inf")).to(tl.float32)  # [BV]
            m_new = tl.maximum(b_m, tl.max(b_x, 0))
            b_s = b_s * tl.exp(b_m - m_new) + tl.sum(tl.exp(b_x - m_new), 0)
            b_m = m_new
        lse = b_m + tl.log(b_s)
        valid = label != IGNORE
        target = tl.load(p_row + tl.where(valid, label, 0)).to(tl.float32)
        tl.store(loss + i_r, tl.where(valid, lse - target, 0.0))
        row_scale = tl.where(valid, tl.load(scale), 0.0)
        for v0 in range(0, V, BV):
            m_v = (v0 + o_v) < V
            b_x = tl.load(p_row + v0 + o_v, mask=m_v, other=0.0).to(tl.float32)  # [BV]
            b_g = tl.exp(b_x - lse) - tl.where((v0 + o_v) == label, 1.0, 0.0)
            tl.store(p_row + v0 + o_v, b_g * row_scale, mask=m_v)


def _cross_entropy_grad_(logits, labels, scale, force_triton=False):
    """Per-row loss [C] of fp32 logits [C, V]; overwrites logits with scale * d loss / d logits."""
    C, V = logits.shape
    if logits.device.type == "cuda" or force_triton:
        require_triton("fused_linear_cross_entropy on a CUDA tensor")
        loss = _alloc((C,), torch.float32, logits.device)
        BV = 1024 if os.environ.get("TRITON_INTERPRET") != "1" else 256
        if C:
            _cross_entropy_grad_kernel[(C,)](logits, labels, loss, scale, logits.stride(0), V, IGNORE=IGNORE_INDEX,
                                             BV=BV, num_warps=8 if logits.device.type == "cuda" else 1)
        return loss
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, safe[:, None])[:, 0]) * valid
    torch.sub(logits, lse[:, None], out=logits).exp_()
    logits[torch.arange(C, device=logits.device), safe] -= 1.0
    logits.mul_((scale * valid)[:, None])
    return loss


def fused_linear_cross_entropy_forward(hidden, weight, labels, chunk_rows=DEFAULT_CHUNK_ROWS, force_triton=False,
                                       need_weight_grad=True):
    """Returns (mean loss, d loss/d hidden, d loss/d weight or None); never holds more than one logits chunk."""
    N = hidden.shape[0]
    count = (labels != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    scale = (1.0 / count).reshape(1)
    grad_hidden = _alloc(hidden.shape, hidden.dtype, hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, N, chunk_rows):
        b_h = hidden[c0:c0 + chunk_rows]  # [C, H]
        b_logits = (b_h @ weight.T).float()  # [C, V]
        total += _cross_entropy_grad_(b_logits, labels[c0:c0 + chunk_rows], scale, force_triton).sum()
        b_g = b_logits.to(hidden.dtype)  # [C, V], the gradient of the mean loss w.r.t. these logits
        grad_hidden[c0:c0 + chunk_rows] = b_g @ weight
        if grad_weight is not None:
            # fp32 contraction: rounding each chunk's product to the input dtype, then the sum and the upstream
            # scale, would round twice. (LoRA training freezes the LM head, so this rarely runs.)
            grad_weight.addmm_(b_logits.T, b_h.float())
    return total * scale[0], grad_hidden, grad_weight


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd of the chunked LM head + cross-entropy: the gradients are computed during the forward pass, chunk
    by chunk, so the full logits never exist; the backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows, force_triton):
        loss, grad_hidden, grad_weight = fused_linear_cross_entropy_forward(
            hidden, weight, labels, chunk_rows, force_triton, need_weight_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.has_weight_grad = grad_weight is not None
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        d_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        d_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return d_hidden, d_weight, None, None, None


def fused_linear_cross_entropy(hidden, weight, labels, *, chunk_rows=DEFAULT_CHUNK_ROWS, force_triton=False):
    """Mean cross-entropy of ``hidden [N, H] @ weight[V, H]^T`` against ``labels [N]`` (IGNORE_INDEX skipped).

    Same value and gradients (w.r.t. hidden and weight) as ``F.cross_entropy(hidden @ weight.T, labels)``, with
    at most ``chunk_rows x V`` logits alive at once. CUDA tensors (or force_triton=True) compute the softmax
    gradient with the Triton kernel; CPU tensors with PyTorch ops.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), int(chunk_rows), force_triton)


def naive_linear_cross_entropy(hidden, weight, labels):
    """Reference: full logits, then torch's cross entropy (run it in float64 for ground truth)."""
    return torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
