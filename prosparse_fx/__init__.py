"""prosparse-fx: ProSparse activation sparsity for LLMs as torch.fx graph passes.

Importing the package registers the ``prosparse::`` ops (``fatrelu``, ``sparse_gated_ffn``,
``sparse_plain_ffn``), the ``prosparse`` torch.compile backend, and ``hidden_act="fatrelu"`` in
transformers, so FATReLU models saved with
``save_pretrained`` reload with ``from_pretrained``.
"""

from . import kernels  # noqa: F401  (registers torch.ops.prosparse.sparse_*_ffn)
from .activations import FATReLU, fatrelu
from .backend import BackendOptions, prosparse_backend
from .backend import register as _register_backend
from .eager_fallback import EagerFallbackError
from .errors import InputError
from .ffn import FFNNotFoundError, FFNSite, find_ffn_sites
from .measure import Evaluation, SparsityReport, evaluate, measure_sparsity, perplexity
from .relufy import relufy_
from .sparse_modules import NotSparseError, sparsify_ffn_
from .taps import activation_l1
from .threshold import calibrate_thresholds, shift_thresholds_, threshold_sweep
from .training import ActivationRegularizer, ConstantSchedule, ProSparseSchedule

_register_backend()


def __getattr__(name: str):  # noqa: ANN202
    """``prosparse_fx.export_onnx`` without importing onnx with the package."""
    if name == "export_onnx":
        from .onnx import export_onnx

        return export_onnx
    raise AttributeError(f"module 'prosparse_fx' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ActivationRegularizer",
    "BackendOptions",
    "ConstantSchedule",
    "EagerFallbackError",
    "Evaluation",
    "FATReLU",
    "FFNNotFoundError",
    "FFNSite",
    "InputError",
    "NotSparseError",
    "ProSparseSchedule",
    "SparsityReport",
    "activation_l1",
    "calibrate_thresholds",
    "evaluate",
    "export_onnx",
    "fatrelu",
    "find_ffn_sites",
    "measure_sparsity",
    "perplexity",
    "prosparse_backend",
    "relufy_",
    "shift_thresholds_",
    "sparsify_ffn_",
    "threshold_sweep",
]
