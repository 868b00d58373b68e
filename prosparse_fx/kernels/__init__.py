"""Sparse-FFN kernels: ``torch.ops.prosparse.sparse_gated_ffn`` and ``sparse_plain_ffn``
(``torch.library`` custom ops) with a dense reference, a CPU implementation and Triton kernels
for CUDA."""

from .cpu import get_cpu_crossover, set_cpu_crossover
from .ops import check_gated, check_plain, sparse_gated_ffn, sparse_plain_ffn
from .reference import gated_ffn_reference, plain_ffn_reference

__all__ = [
    "check_gated",
    "check_plain",
    "gated_ffn_reference",
    "get_cpu_crossover",
    "plain_ffn_reference",
    "set_cpu_crossover",
    "sparse_gated_ffn",
    "sparse_plain_ffn",
]
