"""Triton kernels of llm2vec-fast, installed as ``llm2vec_fast.kernels``.

- ``attention``: bidirectional flash attention over packed variable-length sequences (GQA, dropout).
- ``pooling``: masked segment pooling (mean, weighted mean, first, last) over packed hidden states.
- ``fused_linear_cross_entropy``: the LM head and cross-entropy of MNTP in chunks, without full logits.

Each module holds its kernels, host functions, autograd Function and naive reference; see README.md. Triton is
optional (``_triton``): without it the kernels are not defined and CPU tensors take each op's PyTorch path.
"""

from .attention import naive_varlen_attention, varlen_attention, varlen_attention_dropout_mask
from .pooling import POOLING_MODES, naive_segment_pool, segment_pool

__all__ = [
    "POOLING_MODES",
    "naive_segment_pool",
    "naive_varlen_attention",
    "segment_pool",
    "varlen_attention",
    "varlen_attention_dropout_mask",
]
