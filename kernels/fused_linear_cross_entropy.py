"""Chunked fused linear + cross-entropy: ``mean_i CE(hidden_i @ weight^T, labels_i)`` without full logits.

MNTP scores ~20% of the tokens against a vocabulary of 50k-128k entries; materialising the logits of every scored
row (and their gradient) dominates training memory. Here the rows are processed in chunks: for each chunk the
logits ``[C, V]`` are computed in fp32, turned *in place* into their gradient ``softmax - onehot`` (a Triton
kernel on GPU, two PyTorch ops on CPU), and immediately contracted into ``d hidden = g @ W`` and
``d weight += g^T @ h``. The forward therefore already holds both gradients; backward only scales them by the
incoming gradient. Peak extra memory: one ``[C, V]`` fp32 chunk.

Rows whose label equals ``ignore_index`` contribute nothing; the mean is over the other rows (as
``torch.nn.functional.cross_entropy``).

The file holds the Triton kernel, the per-chunk softmax gradient (Triton or PyTorch), the chunked host function,
the custom op with its autograd, the public entry point and the naive reference.
"""

import torch

from ._common import _alloc, _interpreting
from ._triton import HAS_TRITON, require_triton, tl, triton

IGNORE_INDEX = -100
# Rows per chunk: big enough that the two matmuls per chunk run at full speed, small enough that the fp32
# [C, V] chunk stays a fraction of what full logits would cost (C=4096, V=128k: 2 GiB vs 8 GiB at 16k rows).
DEFAULT_CHUNK_ROWS = 4096


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
        BV = 256 if _interpreting() else 1024
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
    """hidden [N, H], weight [V, H], labels [N]. Returns (mean loss [] fp32, d loss/d hidden [N, H] in hidden's
    dtype, d loss/d weight [V, H] fp32 or None without need_weight_grad); never holds more than one logits chunk."""
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


# The chunked forward as a torch.library custom op, so torch.compile traces through it (the fake implementation
# gives the output shapes without running anything). The op already returns both gradients, computed chunk by
# chunk so the full logits never exist; its registered backward only scales them by the incoming gradient.


@torch.library.custom_op("llm2vec_fast_triton::fused_linear_cross_entropy_forward", mutates_args=())
def fused_linear_cross_entropy_forward_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                          chunk_rows: int, force_triton: bool,
                                          need_weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_linear_cross_entropy_forward` as a custom op: ``(loss [] fp32, d hidden [N, H] in hidden's dtype,
    d weight [V, H] fp32)``; d weight is an empty ``[0]`` fp32 tensor when need_weight_grad is False (an op cannot
    return None)."""
    loss, grad_hidden, grad_weight = fused_linear_cross_entropy_forward(hidden, weight, labels, chunk_rows,
                                                                        force_triton, need_weight_grad)
    return loss, grad_hidden, grad_weight if grad_weight is not None else weight.new_empty(0, dtype=torch.float32)


@fused_linear_cross_entropy_forward_op.register_fake
def _(hidden, weight, labels, chunk_rows, force_triton, need_weight_grad):
    grad_weight_shape = weight.shape if need_weight_grad else (0,)
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty(hidden.shape),
            weight.new_empty(grad_weight_shape, dtype=torch.float32))


def _flce_setup_context(ctx, inputs, output):
    _, weight, _, _, _, need_weight_grad = inputs
    _, grad_hidden, grad_weight = output
    ctx.save_for_backward(grad_hidden, grad_weight)
    ctx.has_weight_grad, ctx.weight_dtype = need_weight_grad, weight.dtype


def _flce_backward(ctx, grad_loss, _grad_grad_hidden, _grad_grad_weight):
    grad_hidden, grad_weight = ctx.saved_tensors
    d_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
    d_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if ctx.has_weight_grad else None
    return d_hidden, d_weight, None, None, None, None


fused_linear_cross_entropy_forward_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


def fused_linear_cross_entropy(hidden, weight, labels, *, chunk_rows=DEFAULT_CHUNK_ROWS, force_triton=False):
    """Mean cross-entropy of ``hidden [N, H] @ weight[V, H]^T`` against ``labels [N]`` (IGNORE_INDEX skipped).

    Same value and gradients (w.r.t. hidden and weight) as ``F.cross_entropy(hidden @ weight.T, labels)``, with
    at most ``chunk_rows x V`` logits alive at once. CUDA tensors (or force_triton=True) compute the softmax
    gradient with the Triton kernel; CPU tensors with PyTorch ops. Returns the loss, a 0-dim fp32 tensor.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    # A frozen weight (the LoRA case) skips the [V, H] fp32 gradient and its matmuls.
    need_weight_grad = weight.requires_grad and torch.is_grad_enabled()
    loss, _, _ = fused_linear_cross_entropy_forward_op(hidden, weight, labels.contiguous(), int(chunk_rows),
                                                       bool(force_triton), need_weight_grad)
    return loss


def naive_linear_cross_entropy(hidden, weight, labels):
    """Reference: full logits, then torch's cross entropy (run it in float64 for ground truth)."""
    return torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX)
