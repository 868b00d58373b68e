"""ONNX deployment: export sparse models in standard ONNX operators, generate with ONNX Runtime.

Needs the ``onnx`` extra (``pip install prosparse-fx[onnx]``: onnx, onnxscript, onnxruntime).
"""

from .cached_decoder import CachedDecoder, CacheLayout
from .export import ONNXExportError, check_output_path, export_onnx
from .runner import OnnxCausalLM
from .translation import DEFAULT_CROSSOVER, translation_table

__all__ = [
    "DEFAULT_CROSSOVER",
    "CacheLayout",
    "CachedDecoder",
    "ONNXExportError",
    "OnnxCausalLM",
    "check_output_path",
    "export_onnx",
    "translation_table",
]
