"""Settings of the main job (``prosparse-fx sparsify``): :class:`SparsifyConfig`, its presets,
and its validation (finite numbers, whole numbers where steps and counts are meant, ranges),
run before any long work."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ImportError:  # Python 3.10: TOML configs need 3.11; JSON works everywhere
    tomllib = None  # type: ignore[assignment]

from .errors import InputError
from .taps import L1_NORMS
from .training.schedule import ProSparseSchedule


@dataclass
class SparsifyConfig:
    """Settings of one sparsify run (all fields can come from ``--config FILE``, JSON or TOML).

    Attributes:
        stages: ``[[lambda, cumulative_end_step], ...]`` of :class:`ProSparseSchedule`; stage 0
            is ReLU-substitution training with its lambda (0), the rest raise lambda.
        max_steps: scale the stage boundaries so the run ends at this step (``None``: as given).
        seq_len: tokens per training and evaluation window.
        batch_size: windows per optimizer step.
        lr: AdamW learning rate (constant after ``warmup_steps`` of linear warmup).
        warmup_steps: linear LR warmup steps.
        weight_decay: AdamW weight decay.
        norm: L1 normalisation, ``"mean"`` (mean |x1| per layer, summed over layers) or
            ``"token_l1"``.
        threshold_mode: ``"fixed"`` (FATReLU t = ``threshold`` for all layers), ``"target"``
            (per-layer t calibrated to ``target_sparsity`` on calibration text) or ``"none"``.
        threshold: t for ``"fixed"``.
        target_sparsity: sparsity for ``"target"``.
        sweep_thresholds: global thresholds measured on calibration text (paper Table 9).
        eval_windows: held-out windows for perplexity and sparsity.
        calib_windows: calibration windows (training documents' sibling split, not held-out).
        seed: seed of the data split and order.
        precision: training forward precision: ``"auto"`` (bf16 autocast where the device has
            fast bf16 matmuls: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX; else fp32),
            ``"bf16"`` or ``"fp32"``. Weights, optimizer and all evaluations stay float32.
        checkpoint_every: optimizer steps between training checkpoints in ``out/checkpoint``
            (also written at each stage end); a killed run loses at most this many steps.
    """

    stages: list[list[float]] = field(
        default_factory=lambda: [[0.0, 100], [0.05, 120], [0.12, 170], [0.12, 200]]
    )
    max_steps: int | None = None
    seq_len: int = 128
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    norm: Literal["mean", "token_l1"] = "mean"
    threshold_mode: Literal["fixed", "target", "none"] = "fixed"
    threshold: float = 0.35
    target_sparsity: float = 0.85
    sweep_thresholds: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5]
    )
    eval_windows: int = 16
    calib_windows: int = 16
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint_every: int = 50

    def schedule(self) -> ProSparseSchedule:
        """The lambda schedule, scaled to ``max_steps`` when it is set."""
        schedule = ProSparseSchedule.from_stages(self.stages)
        return schedule.scaled(self.max_steps) if self.max_steps is not None else schedule

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> SparsifyConfig:
        """Read a JSON or TOML file of config fields; ``overrides`` (not ``None``) win.

        Raises:
            InputError: unreadable file, bad syntax, or unknown field names.
        """
        p = Path(path)
        if p.suffix == ".toml" and tomllib is None:
            raise InputError("TOML configs need Python 3.11+; use a JSON config")
        try:
            text = p.read_text(encoding="utf-8")
            data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read config {p}: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(
                f"config {p} must be a table of SparsifyConfig fields, got {type(data).__name__}"
            )
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        """Build from a dict, with an error naming unknown fields and the valid ones."""
        if not isinstance(data, dict):
            raise InputError(
                f"a config must be a table of SparsifyConfig fields, got {type(data).__name__}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown config field(s) {unknown}; valid: {sorted(names)}")
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`InputError` for a wrong type or an out-of-range setting, before any
        long work."""
        for name in ("seq_len", "batch_size", "eval_windows", "calib_windows", "warmup_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < (0 if name == "warmup_steps" else 1):
                raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.seq_len < 2:
            raise InputError("seq_len must be at least 2")
        if not _is_int(self.seed):
            raise InputError(f"seed must be a whole number, got {self.seed!r}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise InputError(f"max_steps must be a whole number >= 1, got {self.max_steps!r}")
        for name in ("lr", "weight_decay", "threshold", "target_sparsity"):
            value = getattr(self, name)
            if not _is_number(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.threshold_mode not in ("fixed", "target", "none"):
            raise InputError(
                f"threshold_mode must be 'fixed', 'target' or 'none', got {self.threshold_mode!r}"
            )
        if self.norm not in L1_NORMS:
            raise InputError(f"norm must be one of {list(L1_NORMS)}, got {self.norm!r}")
        if not _is_int(self.checkpoint_every) or self.checkpoint_every < 1:
            raise InputError(
                f"checkpoint_every must be a whole number >= 1, got {self.checkpoint_every!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if not self.threshold >= 0:
            raise InputError(f"threshold must be >= 0, got {self.threshold}")
        if not 0 <= self.target_sparsity < 1:
            raise InputError(f"target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if not isinstance(self.sweep_thresholds, list) or not all(
            _is_number(t) and t >= 0 for t in self.sweep_thresholds
        ):
            raise InputError(
                f"sweep_thresholds must be a list of numbers >= 0, got {self.sweep_thresholds!r}"
            )
        try:
            self.schedule()
        except (ValueError, TypeError) as exc:
            raise InputError(f"bad stages/max_steps: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


PRESETS: dict[str, dict[str, Any]] = {
    # Ends in under 15 minutes on 2 CPU cores (measured; see README).
    "default": {},
    # The long version for a GPU or a patient CPU: 10x the steps, 4x the tokens per step.
    "long": {
        "stages": [[0.0, 1400], [0.05, 1650], [0.12, 2400], [0.12, 2800]],
        "batch_size": 8,
        "seq_len": 256,
        "eval_windows": 64,
        "calib_windows": 32,
    },
}
