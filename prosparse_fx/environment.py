"""The machine a run uses: the torch device, the training precision it supports, and the
machine facts recorded with every result."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from .errors import InputError


def accepted_devices() -> list[str]:
    """The devices training can run on here: ``cpu``; ``cuda`` and ``cuda:0`` ...
    ``cuda:N-1`` where torch sees N CUDA devices; ``mps`` where Metal is available."""
    accepted = ["cpu"]
    if torch.cuda.is_available():
        accepted += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        accepted.append("mps")
    return accepted


def check_device(device: str | None) -> str:
    """The torch device to run on (default: CUDA if available, else CPU).

    Only devices that can train here pass (:func:`accepted_devices`): ``cpu``, ``cuda`` or
    ``cuda:N`` with N below the CUDA device count, and ``mps`` where it is available. ``meta``
    (no data), ``xla``, ``ipu`` and the like are refused by name.

    Raises:
        InputError: an unknown device name, a device type training cannot use, CUDA or MPS
            asked for where there is none, or a CUDA index beyond the devices present; the
            message lists the accepted devices.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    accepted = ", ".join(accepted_devices())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r}; use one of: {accepted}") from exc
    if dev.type == "cpu" and dev.index in (None, 0):
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {device!r} asked for, but this torch has no CUDA GPU; use one of: "
                f"{accepted}"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(
                f"device {device!r} asked for, but there are {count} CUDA devices "
                f"(CUDA_VISIBLE_DEVICES may hide some); use one of: {accepted}"
            )
        return device
    if dev.type == "mps" and dev.index in (None, 0):
        if not torch.backends.mps.is_available():
            raise InputError(
                f"device {device!r} asked for, but MPS (Apple Metal) is not available in this "
                f"torch on this machine; use one of: {accepted}"
            )
        return device
    if dev.type == "meta":
        why = "meta tensors hold no data, so nothing can be trained or saved"
    elif dev.type in ("cpu", "mps"):
        why = f"{dev.type} has only index 0"
    else:
        why = f"training runs on cpu, cuda or mps, not on {dev.type}"
    raise InputError(f"device {device!r} cannot run training: {why}; use one of: {accepted}")


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of training for ``precision`` on ``device`` (``None``: float32).

    ``"auto"`` picks bfloat16 where bf16 matmuls are fast (CUDA GPUs that support bf16; CPUs
    with AVX512-BF16 or AMX, as oneDNN reports them), else float32 (also on MPS).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if torch.device(device).type != "cpu":  # mps: float32 unless bf16 is asked for
        return None
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


def peak_memory(device: str, weights: torch.nn.Module | None = None) -> dict[str, Any]:
    """The peak memory of this process so far, in bytes: resident set on the host
    (``ru_maxrss``), and allocated memory on a CUDA device; with ``weights``, also the bytes of
    that model's parameters and each peak as a multiple of them."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info: dict[str, Any] = {"host_bytes": int(rss) * (1 if sys.platform == "darwin" else 1024)}
    if torch.device(device).type == "cuda":
        info["cuda_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    if weights is not None:
        size = sum(p.numel() * p.element_size() for p in weights.parameters())
        info["weights_bytes"] = size
        for key in ("host", "cuda"):
            if f"{key}_bytes" in info and size:
                info[f"{key}_multiple_of_weights"] = info[f"{key}_bytes"] / size
    return info


def available_memory(device: str) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the host's
    ``MemAvailable`` (Linux) for the CPU; ``None`` where it cannot be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    if dev.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
