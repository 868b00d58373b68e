"""The sparse-FFN custom ops (``torch.library``), their checks and fake implementations.

``torch.ops.prosparse.sparse_gated_ffn(x, w_gate, w_up, w_down_t, threshold)`` and
``torch.ops.prosparse.sparse_plain_ffn(x, w1, b1, w2_t, b2, threshold)`` compute the dense
references of :mod:`.reference` exactly (within float tolerance), skipping the neurons whose
activation is zero (ProSparse App. D); ``sparse_gated_ffn(..., up_relu=True)`` is the dReLU FFN
(TurboSparse Sec. 3), which also skips the neurons whose up projection is <= 0. Implementations
are chosen per device: CPU
(:mod:`.cpu`), CUDA through Triton (:mod:`.triton_ffn`), the reference elsewhere. Fake (meta)
implementations let torch.export keep each op as one node and torch.compile trace it.
"""

from __future__ import annotations

import torch

from ..activations import check_threshold
from . import cpu
from .reference import gated_ffn_reference, plain_ffn_reference


def _check_common(x: torch.Tensor, threshold: float, named: dict[str, torch.Tensor]) -> None:
    check_threshold(threshold)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., d], got a 0-dim tensor")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x has dtype {x.dtype}; the sparse FFN needs floating-point tensors")
    if x.shape[-1] == 0:
        raise ValueError("x must have shape [..., d] with d >= 1, got d = 0")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype"
            )
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them together")


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ({meaning}), got {list(t.shape)}")


def check_gated(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> None:
    """Raise a ValueError/TypeError naming the first tensor whose shape, dtype or device is off."""
    _check_common(x, threshold, {"w_gate": w_gate, "w_up": w_up, "w_down_t": w_down_t})
    if w_gate.dim() != 2:
        raise ValueError(f"w_gate must be 2-D [d_ff, d], got shape {list(w_gate.shape)}")
    d_ff, d = w_gate.shape
    if x.shape[-1] != d:
        raise ValueError(
            f"x must have shape [..., {d}] to match w_gate [d_ff, d], got {list(x.shape)}"
        )
    _expect("w_up", w_up, (d_ff, d), "d_ff x d, like w_gate")
    if w_down_t.dim() != 2 or w_down_t.shape[0] != d_ff:
        raise ValueError(
            f"w_down_t must have shape [{d_ff}, d_out] (the transpose of down_proj.weight), "
            f"got {list(w_down_t.shape)}"
        )


def check_plain(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> None:
    """Raise a ValueError/TypeError naming the first tensor whose shape, dtype or device is off."""
    named = {"w1": w1, "w2_t": w2_t}
    if b1 is not None:
        named["b1"] = b1
    if b2 is not None:
        named["b2"] = b2
    _check_common(x, threshold, named)
    if w1.dim() != 2:
        raise ValueError(f"w1 must be 2-D [d_ff, d], got shape {list(w1.shape)}")
    d_ff, d = w1.shape
    if x.shape[-1] != d:
        raise ValueError(f"x must have shape [..., {d}] to match w1 [d_ff, d], got {list(x.shape)}")
    if w2_t.dim() != 2 or w2_t.shape[0] != d_ff:
        raise ValueError(
            f"w2_t must have shape [{d_ff}, d_out] (the transpose of fc2.weight), "
            f"got {list(w2_t.shape)}"
        )
    if b1 is not None:
        _expect("b1", b1, (d_ff,), "d_ff")
    if b2 is not None:
        _expect("b2", b2, (w2_t.shape[1],), "d_out")


@torch.library.custom_op("prosparse::sparse_gated_ffn", mutates_args=())
def sparse_gated_ffn(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    threshold: float,
    up_relu: bool = False,
) -> torch.Tensor:
    """Gated FFN with FATReLU gate (and, for dReLU, ReLU on up), skipping inactive neurons.

    Computes ``(FATReLU_t(x @ w_gate.T) * (x @ w_up.T)) @ w_down_t`` (ProSparse Sec. 3, App. D);
    with ``up_relu`` the dReLU FFN ``(FATReLU_t(x @ w_gate.T) * ReLU(x @ w_up.T)) @ w_down_t``
    (TurboSparse, Song et al. 2024, Sec. 3; ``t = 0`` is the paper's dReLU). The gate is dense;
    up is computed for the neurons the gate keeps for some token; with ``up_relu`` down then
    reads only the neurons whose x1 is nonzero for some token, i.e. active gate AND up > 0.

    Args:
        x: ``[..., d]`` float32, float16 or bfloat16 (any number of leading dims, also 0).
        w_gate, w_up: ``[d_ff, d]`` (``nn.Linear`` layout), same dtype and device as ``x``.
        w_down_t: ``[d_ff, d_out]``, the transpose of ``down_proj.weight``.
        threshold: FATReLU t >= 0 of the gate (0 is ReLU).
        up_relu: ReLU on the up projection too (dReLU). Default ``False``.

    Returns:
        ``[..., d_out]``, dtype of ``x``.

    Rows of ``w_up`` and ``w_down_t`` whose neuron is inactive for every token are not read,
    so a NaN or inf stored there does not reach the output (the dense product would turn it
    into NaN); NaN in ``x`` or in the gate does, as in the dense model. On CUDA, float64 runs
    the dense reference (the Triton kernels take fp32, fp16 and bf16).

    Raises:
        ValueError: a shape or device mismatch (naming the tensor and the shape expected),
            ``d == 0``, or ``threshold < 0``.
        TypeError: a dtype mismatch, or a dtype that is not floating point.
    """
    check_gated(x, w_gate, w_up, w_down_t, threshold, up_relu)
    return gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold, up_relu)


@sparse_gated_ffn.register_fake
def _gated_fake(x, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_gated(x, w_gate, w_up, w_down_t, threshold, up_relu)
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


@sparse_gated_ffn.register_kernel("cpu")
def _gated_cpu(x, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_gated(x, w_gate, w_up, w_down_t, threshold, up_relu)
    return cpu.gated_ffn(x, w_gate, w_up, w_down_t, threshold, up_relu)


@sparse_gated_ffn.register_kernel("cuda")
def _gated_cuda(x, w_gate, w_up, w_down_t, threshold, up_relu=False):  # noqa: ANN001, ANN202
    check_gated(x, w_gate, w_up, w_down_t, threshold, up_relu)
    from . import triton_ffn

    if not triton_ffn.available() or x.dtype not in triton_ffn.DTYPES:
        return gated_ffn_reference(x, w_gate, w_up, w_down_t, threshold, up_relu)
    return triton_ffn.gated_ffn(x, w_gate, w_up, w_down_t, threshold, up_relu)


@torch.library.custom_op("prosparse::sparse_plain_ffn", mutates_args=())
def sparse_plain_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2_t: torch.Tensor,
    b2: torch.Tensor | None,
    threshold: float,
) -> torch.Tensor:
    """Plain FFN with FATReLU, skipping inactive neurons in the second linear.

    Computes ``FATReLU_t(x @ w1.T + b1) @ w2_t + b2`` (ReLU'd BERT, GPT-2, OPT).

    Args:
        x: ``[..., d]``.
        w1: ``[d_ff, d]``; b1: ``[d_ff]`` or ``None``.
        w2_t: ``[d_ff, d_out]`` (transpose of ``fc2.weight``); b2: ``[d_out]`` or ``None``.
        threshold: t >= 0.

    Raises:
        ValueError, TypeError: as for :func:`sparse_gated_ffn`.
    """
    check_plain(x, w1, b1, w2_t, b2, threshold)
    return plain_ffn_reference(x, w1, b1, w2_t, b2, threshold)


@sparse_plain_ffn.register_fake
def _plain_fake(x, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_plain(x, w1, b1, w2_t, b2, threshold)
    return x.new_empty((*x.shape[:-1], w2_t.shape[1]))


@sparse_plain_ffn.register_kernel("cpu")
def _plain_cpu(x, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_plain(x, w1, b1, w2_t, b2, threshold)
    return cpu.plain_ffn(x, w1, b1, w2_t, b2, threshold)


@sparse_plain_ffn.register_kernel("cuda")
def _plain_cuda(x, w1, b1, w2_t, b2, threshold):  # noqa: ANN001, ANN202
    check_plain(x, w1, b1, w2_t, b2, threshold)
    from . import triton_ffn

    if not triton_ffn.available() or x.dtype not in triton_ffn.DTYPES:
        return plain_ffn_reference(x, w1, b1, w2_t, b2, threshold)
    return triton_ffn.plain_ffn(x, w1, b1, w2_t, b2, threshold)
