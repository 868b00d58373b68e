"""Sparse-FFN kernels: ``torch.ops.prosparse.sparse_gated_ffn`` and ``sparse_plain_ffn``
(``torch.library`` custom ops) with a dense reference, a CPU implementation and Triton kernels
for CUDA; ``predicted_gated_ffn`` and ``predicted_plain_ffn``, approximate mode's ops
(:mod:`.predicted`)."""

from .cpu import get_cpu_crossover, set_cpu_crossover
from .ops import check_gated, check_plain, sparse_gated_ffn, sparse_plain_ffn
from .predicted import (
    check_predicted_gated,
    check_predicted_plain,
    predicted_gated_ffn,
    predicted_plain_ffn,
)
from .reference import gated_ffn_reference, plain_ffn_reference

__all__ = [
    "check_gated",
    "check_plain",
    "check_predicted_gated",
    "check_predicted_plain",
    "gated_ffn_reference",
    "get_cpu_crossover",
    "plain_ffn_reference",
    "predicted_gated_ffn",
    "predicted_plain_ffn",
    "set_cpu_crossover",
    "sparse_gated_ffn",
    "sparse_plain_ffn",
]
