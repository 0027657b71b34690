"""Chunked fused linear + cross-entropy against full logits + torch cross entropy in float64: loss, d hidden,
d weight; ignored rows; chunk boundaries that do not divide the row count."""

import pytest
import torch
from devices import DEVICE, on

from llm2vec_fast.kernels.fused_linear_cross_entropy import (IGNORE_INDEX, fused_linear_cross_entropy,
                                                           naive_linear_cross_entropy)

FP = {"fp32": torch.float32, "fp16": torch.float16}
# (N rows, H, V, chunk rows, ignored rows)
CASES = {
    "N1-H64-V300-C8": (1, 64, 300, 8, 0),
    "N63-H40-V777-C16-ign5": (63, 40, 777, 16, 5),
    "N111-H64-V1031-C111": (111, 64, 1031, 111, 0),
    "N40-H32-V257-C7-allbut1ign": (40, 32, 257, 7, 39),
}


def make(N, H, V, ignored, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g, dtype=torch.float64)).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.randperm(N, generator=g)[:ignored]] = IGNORE_INDEX
    return h.to(device), w.to(device), labels.to(device)


def run(fn, h, w, labels):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    dh, dw = torch.autograd.grad(loss * 1.5, (h, w))  # a non-unit upstream gradient
    return loss.detach(), dh, dw


@pytest.mark.parametrize("force_triton", [True, False], ids=["triton", "cpu"])
@pytest.mark.parametrize("dtype", list(FP))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_full_logits(check, case, dtype, force_triton):
    N, H, V, C, ignored = CASES[case]
    dt = FP[dtype]
    h, w, labels = make(N, H, V, ignored, dt, device=on(force_triton))
    got = run(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_rows=C, force_triton=force_triton),
              h, w, labels)
    ref64 = run(naive_linear_cross_entropy, h.double(), w.double(), labels)
    reflp = run(naive_linear_cross_entropy, h, w, labels)  # full logits in the test dtype
    for name, a, r64, rlp in zip(("loss", "dhidden", "dweight"), got, ref64, reflp):
        check(name, a, r64, rlp, dt)


def test_all_rows_ignored_gives_zero_loss_and_grads():
    h, w, labels = make(10, 16, 50, 10, torch.float32)
    loss, dh, dw = run(lambda h, w, y: fused_linear_cross_entropy(h, w, y, chunk_rows=4), h, w, labels)
    assert loss.item() == 0 and torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


def test_frozen_weight_skips_its_gradient():
    h, w, labels = make(20, 16, 50, 0, torch.float32)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, chunk_rows=8)
    loss.backward()
    assert h.grad is not None and w.grad is None


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="labels must be"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
