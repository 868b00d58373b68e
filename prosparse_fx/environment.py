"""The machine a run uses: the torch device, the training precision it supports, and the
machine facts recorded with every result."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from .errors import InputError


def check_device(device: str | None) -> str:
    """The torch device to run on (default: CUDA if available, else CPU).

    Raises:
        InputError: an unknown device name, or CUDA asked for where there is none.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this torch has no CUDA GPU")
    return device


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of training for ``precision`` on ``device`` (``None``: float32).

    ``"auto"`` picks bfloat16 where bf16 matmuls are fast (CUDA GPUs that support bf16; CPUs
    with AVX512-BF16 or AMX, as oneDNN reports them), else float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def machine_info() -> dict[str, Any]:
    """The machine a result was measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
