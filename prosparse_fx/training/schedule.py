"""Lambda schedules for the sparsity regularization (ProSparse Sec. 3.2, App. B, Algorithm 1)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProSparseSchedule:
    """Multi-stage sine schedule of the L1 weight lambda(t) (paper App. B, Algorithm 1).

    Stages are ``(peak lambda, cumulative end step)`` pairs ``(lam_0, T_0), ..., (lam_S, T_S)``:

    * stage 0 (activation substitution): ``lam_0`` (usually 0) over ``[0, T_0]``;
    * stage 1 (warmup): ``lam_1`` held constant over ``(T_0, T_1]``;
    * stage i >= 2: over ``(T_{i-1}, T_i]``,
      ``lambda = lam_{i-1} + eta * (lam_i - lam_{i-1})``, ``eta = (1 - cos(pi * p)) / 2``,
      ``p = (t - T_{i-1}) / (T_i - T_{i-1})``; equal peaks make a flat stage;
    * after ``T_S``: ``lam_S``.

    The paper's LLaMA2-7B stages are ``[(0, 5000), (5e-3, 6000), (5e-2, 10000), (5e-2, 12000),
    (2e-1, 16000), (2e-1, 16500)]``.

    Raises:
        ValueError: no stages, a negative or non-finite lambda, lambdas that decrease after
            stage 0, or end steps that are not strictly increasing non-negative integers.
    """

    lambdas: tuple[float, ...]
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.lambdas or len(self.lambdas) != len(self.ends):
            raise ValueError("a schedule needs at least one (lambda, end_step) stage")
        for lam in self.lambdas:
            if not (lam >= 0 and math.isfinite(lam)):
                raise ValueError(f"stage lambdas must be finite and >= 0, got {lam!r}")
        if any(b < a for a, b in zip(self.lambdas[1:], self.lambdas[2:])):
            raise ValueError(
                f"stage peaks must not decrease after stage 0 (paper: lambda_1 <= ... <= "
                f"lambda_S), got {list(self.lambdas)}"
            )
        if self.ends[0] < 0 or any(b <= a for a, b in zip(self.ends, self.ends[1:])):
            raise ValueError(
                f"stage end steps must be strictly increasing and >= 0, got {list(self.ends)}"
            )

    @classmethod
    def from_stages(cls, stages: Sequence[Sequence[float]]) -> ProSparseSchedule:
        """Build from ``[(lam_0, T_0), (lam_1, T_1), ...]`` (peak lambda, cumulative end step).

        Raises:
            ValueError: as the class does, and for a lambda that is not a number or an end step
                that is not a whole number (an integer type: ``2.7``, ``4.0``, ``"4"`` and
                ``True`` are refused, never truncated or parsed).
        """
        try:
            pairs = [(s[0], s[1]) for s in stages if len(s) == 2]
        except (TypeError, IndexError, KeyError) as exc:
            raise ValueError(f"stages must be (lambda, end_step) pairs, got {stages!r}") from exc
        if len(pairs) != len(stages):
            raise ValueError(f"stages must be (lambda, end_step) pairs, got {stages!r}")
        for i, (lam, end) in enumerate(pairs):
            # no silent conversion: 2.7 is not truncated to 2, nor "4" read as 4
            if not isinstance(lam, numbers.Real) or isinstance(lam, bool):
                raise ValueError(f"stages[{i}] lambda must be a number, got {lam!r}")
            if not isinstance(end, numbers.Integral) or isinstance(end, bool):
                raise ValueError(f"stages[{i}] end step must be a whole number, got {end!r}")
        return cls(tuple(float(lam) for lam, _ in pairs), tuple(int(end) for _, end in pairs))

    @property
    def total_steps(self) -> int:
        """The last stage's end step T_S."""
        return self.ends[-1]

    def stage(self, step: int) -> int:
        """Index of the stage that contains ``step`` (the last stage after it ends)."""
        for i, end in enumerate(self.ends):
            if step <= end:
                return i
        return len(self.ends) - 1

    def __call__(self, step: int) -> float:
        """lambda at optimizer step ``step`` (float, >= 0)."""
        if step > self.ends[-1]:
            return self.lambdas[-1]
        i = self.stage(step)
        if i <= 1:
            return self.lambdas[i]
        start, end = self.ends[i - 1], self.ends[i]
        p = (step - start) / (end - start)
        eta = (1.0 - math.cos(math.pi * p)) / 2.0
        lo, hi = self.lambdas[i - 1], self.lambdas[i]
        return lo + eta * (hi - lo)

    def scaled(self, total_steps: int) -> ProSparseSchedule:
        """The same stages with boundaries scaled so the last ends at ``total_steps``.

        Every stage keeps at least one step. Raises ValueError if ``total_steps`` is smaller
        than the number of stages.
        """
        n = len(self.ends)
        if total_steps < n:
            raise ValueError(f"{total_steps} steps cannot hold {n} stages; use at least {n}")
        scale = total_steps / max(self.ends[-1], 1)
        ends: list[int] = []
        for i, end in enumerate(self.ends):
            lo = ends[-1] + 1 if ends else 0 if self.ends[0] == 0 else 1
            hi = total_steps - (n - 1 - i)
            ends.append(min(max(round(end * scale), lo), hi))
        ends[-1] = total_steps
        return ProSparseSchedule(self.lambdas, tuple(ends))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: ``{"type": "prosparse", "stages": [[lambda, end], ...]}``."""
        return {
            "type": "prosparse",
            "stages": [[lam, t] for lam, t in zip(self.lambdas, self.ends)],
        }


@dataclass(frozen=True)
class ConstantSchedule:
    """Constant lambda (the paper's ablation baseline, Table 5).

    Raises:
        ValueError: ``lam`` negative or not finite.
    """

    lam: float

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be finite and >= 0, got {self.lam!r}")

    def __call__(self, step: int) -> float:
        return self.lam

    def stage(self, step: int) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"type": "constant", "lambda": self.lam}
