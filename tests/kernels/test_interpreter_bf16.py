"""The ``interpreter_bf16`` fixture (conftest.py): with it, a bf16 ``tl.dot`` and an fp32 -> bf16 cast in the
interpreter give bit for bit what the GPU gives (fp32 accumulation of exact bf16 products; round to nearest even).
"""

import pytest
import torch
from devices import ON_GPU

from llm2vec_fast.kernels._triton import tl, triton

pytestmark = pytest.mark.skipif(ON_GPU, reason="checks the interpreter's bf16; compiled kernels do not use it")


@triton.jit
def _dot_and_cast_kernel(a, b, c, c16, N: tl.constexpr):
    o_n = tl.arange(0, N)
    p = o_n[:, None] * N + o_n[None, :]
    b_c = tl.dot(tl.load(a + p), tl.load(b + p))  # [N, N] fp32
    tl.store(c + p, b_c)
    tl.store(c16 + p, b_c.to(tl.bfloat16))


def test_bf16_dot_and_cast_match_torch():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    c = torch.full((16, 16), float("nan"))
    c16 = torch.full((16, 16), float("nan"), dtype=torch.bfloat16)
    _dot_and_cast_kernel[(1,)](a, b, c, c16, N=16)
    ref = a.double() @ b.double()  # bf16 products are exact in fp32; only the fp32 sums round
    assert (c.double() - ref).abs().max().item() < 1e-5
    assert torch.equal(c16.view(torch.int16), c.bfloat16().view(torch.int16))
