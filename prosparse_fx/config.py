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
from .texts import OUT_OF_DOMAIN, check_text_names
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
        norm: the penalty's normalisation (:func:`~prosparse_fx.activation_l1`): ``"mean"``
            (mean |x1| per layer, summed over layers), ``"token_l1"`` (``d_ff`` times
            ``"mean"``) or ``"hoyer"`` (scale-invariant L1/L2).
        activation: what replaces SiLU/GELU: ``"relu"`` (ProSparse Sec. 3.1) or ``"drelu"``
            (TurboSparse: ReLU on the gate and on up; gated FFNs only), both shifted to FATReLU
            on the gate by the threshold step.
        threshold_mode: ``"fixed"`` (FATReLU t = ``threshold`` for all layers), ``"target"``
            (t calibrated to ``target_sparsity`` on calibration text), ``"budget"`` (t for the
            highest sparsity whose calibration perplexity is within ``threshold_budget`` times
            the unshifted model's: :func:`~prosparse_fx.threshold.calibrate_to_budget`) or
            ``"none"``.
        threshold_scope: for ``"target"`` and ``"budget"``: ``"model"`` (one t for all
            layers, the quantile of their pooled gate pre-activations) or ``"layer"`` (each
            layer's own quantile, equal sparsity per layer; measured worse at equal overall
            sparsity on SmolLM2, README "the quality frontier").
        threshold: t for ``"fixed"`` (0.35 was tuned on SmolLM2; on Gemma-3-270M it doubles
            perplexity, hence the default ``"budget"``, which fits t to each model).
        target_sparsity: sparsity for ``"target"``.
        threshold_budget: perplexity ratio allowed by ``"budget"`` (>= 1).
        sweep_thresholds: global thresholds measured on calibration text (paper Table 9).
        eval_windows: held-out windows for perplexity and sparsity.
        calib_windows: calibration windows (training documents' sibling split, not held-out).
        seed: seed of the data split and order.
        precision: training forward precision: ``"auto"`` (bf16 autocast where the device has
            fast bf16 matmuls: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX; else fp32),
            ``"bf16"`` or ``"fp32"``. Weights, optimizer and all evaluations stay float32.
        checkpoint_every: optimizer steps between training checkpoints in ``out/checkpoint``
            (also written at each stage end at least ``checkpoint_every // 4`` steps after the
            last one); a killed run loses at most this many steps.
        lr_decay: the learning rate after warmup: ``"constant"``, or a ``"linear"`` or
            ``"cosine"`` decay to ``min_lr_ratio * lr`` at the last step.
        min_lr_ratio: the final learning rate of a decay, as a fraction of ``lr``.
        distill: weight of the KL divergence to the original model (the teacher, before ReLU
            substitution) in the task loss, ``(1 - distill) * LM + distill * KL``; 0: no
            teacher is kept (:mod:`prosparse_fx.training.distill`).
        distill_temperature: the distillation temperature T > 0 (the KL is scaled by T^2).
        substitution: the fraction of stage 0's steps over which the original activation
            blends into ReLU (:mod:`prosparse_fx.training.substitution`); 0: the abrupt swap of
            the paper (Sec. 3.1).
        refit_windows: training windows whose tokens reconstruct each FFN's down_proj for the
            swap, in closed form (:mod:`prosparse_fx.reconstruct`: ridge least squares to the
            original FFN's output); 0: the paper's plain swap.
        refit_ridge: the reconstruction's ridge weight, relative to the mean diagonal of
            ``x1^T x1`` (> 0).
        train_texts: named offline texts (:data:`prosparse_fx.texts.TRAINABLE`) whose documents
            join the training text's training split (a more varied mix against forgetting);
            never the held-out or calibration parts.
        eval_texts: out-of-domain texts (:data:`prosparse_fx.texts.OUT_OF_DOMAIN`) on which the
            original and the final model are measured on the same windows; never trained on.

    :meth:`validate` checks each field by its rule in :data:`FIELD_RULES` (type, whole number
    or not, finite, range).
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
    norm: Literal["mean", "token_l1", "hoyer"] = "mean"
    activation: Literal["relu", "drelu"] = "relu"
    threshold_mode: Literal["fixed", "target", "budget", "none"] = "budget"
    threshold_scope: Literal["model", "layer"] = "model"
    threshold: float = 0.35
    target_sparsity: float = 0.85
    threshold_budget: float = 1.10
    sweep_thresholds: list[float] = field(
        default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5]
    )
    eval_windows: int = 16
    calib_windows: int = 16
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    checkpoint_every: int = 50
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.1
    distill: float = 0.0
    distill_temperature: float = 1.0
    substitution: float = 0.0
    refit_windows: int = 0
    refit_ridge: float = 0.01
    train_texts: list[str] = field(default_factory=list)
    eval_texts: list[str] = field(default_factory=lambda: list(OUT_OF_DOMAIN))

    VERSION = 1  # of the dict form: to_dict writes it, from_dict refuses a newer one

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values, with ``"version"`` (:attr:`VERSION`): what
        ``report.json`` records and :meth:`from_dict` reads back."""
        return {"version": self.VERSION, **dataclasses.asdict(self)}

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
        except RecursionError as exc:
            raise InputError(f"cannot read config {p}: it is nested too deep") from exc
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read config {p}: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(
                f"config {p} must be a table of SparsifyConfig fields, got {type(data).__name__}"
            )
        return cls.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsifyConfig:
        """Build from a dict (a config file's table, or :meth:`to_dict`'s output), with an error
        naming unknown fields and the valid ones.

        A ``"version"`` key, when present, must be a whole number no newer than
        :attr:`VERSION` (a config written by a newer prosparse-fx is refused, not misread); a
        dict without one (a hand-written config) is read as the current version.

        Raises:
            InputError: not a dict, a bad or newer version, unknown fields, or a field value
                that :meth:`validate` refuses.
        """
        if not isinstance(data, dict):
            raise InputError(
                f"a config must be a table of SparsifyConfig fields, got {type(data).__name__}"
            )
        data = dict(data)
        version = data.pop("version", cls.VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"config version must be a whole number >= 1, got {version!r}")
        if version > cls.VERSION:
            raise InputError(
                f"config version {version} was written by a newer prosparse-fx (this one reads "
                f"version {cls.VERSION}); upgrade prosparse-fx"
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
        long work.

        Every field is checked by its rule in :data:`FIELD_RULES` (type, whole number or not,
        finite, range); the message names the field, the value given and what is accepted.
        Then ``max_steps`` must leave every stage at least one step.
        """
        for f in dataclasses.fields(self):
            FIELD_RULES[f.name].check(f.name, getattr(self, f.name))
        if self.activation == "drelu" and self.substitution > 0:
            raise InputError(
                "substitution (a smooth blend into ReLU) blends the gate's activation only, and "
                "dReLU also puts a ReLU on up: set substitution = 0 with activation = 'drelu'"
            )
        if self.refit_windows > 0 and self.substitution > 0:
            raise InputError(
                "refit_windows reconstructs down_proj for the ReLU model at the swap, and "
                "substitution then blends the original activation back in over stage 0: set "
                "refit_windows = 0 or substitution = 0"
            )
        n = len(self.stages)
        if self.max_steps is not None and self.max_steps < n:
            raise InputError(
                f"max_steps must be at least the number of stages ({n} stages need >= {n} "
                f"steps, one each), got {self.max_steps!r}"
            )
        try:
            schedule = self.schedule()
        except (ValueError, TypeError) as exc:
            raise InputError(f"bad stages/max_steps: {exc}") from exc
        ends = schedule.ends
        if ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])):  # not expected: a guard
            raise InputError(
                f"stages {self.stages!r} scaled to max_steps={self.max_steps} give stage ends "
                f"{list(ends)}, with a stage of no steps; choose a larger max_steps"
            )


LR_DECAYS = ("constant", "linear", "cosine")
"""The learning-rate shapes after warmup (:func:`prosparse_fx.training.trainer.lr_factor`)."""

MAX_STEPS = 10_000_000
"""The largest step count a config may give (stage ends, ``max_steps``, ``warmup_steps``,
``checkpoint_every``): 600 times the paper's LLaMA2-7B run; a larger one is a typo."""

MAX_STAGES = 1000
"""The most stages a schedule may have."""


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``, not ``4.0``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite ``int`` or ``float`` (not a ``bool``; an int too large for
    a float is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400 in a JSON file)
        return False


@dataclass(frozen=True)
class Whole:
    """A whole number: a Python ``int`` (not a bool, not ``4.0``, not ``"4"``) in
    ``[lo, hi]``; ``why`` says where the range comes from. ``optional``: ``None`` is allowed."""

    lo: int
    hi: int
    why: str = ""
    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if is_whole_number(value) and self.lo <= value <= self.hi:
            return
        why = f" ({self.why})" if self.why else ""
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f"; write {int(value)}, not {value!r}"
        raise InputError(
            f"{name} must be a whole number >= {self.lo} and <= {self.hi}{why}, got {value!r}{hint}"
        )


@dataclass(frozen=True)
class Real:
    """A finite number (an ``int`` or ``float``, not a bool or a string) with ``lo`` and
    optionally ``hi`` as bounds (``*_open``: the bound itself is excluded)."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def check(self, name: str, value: Any) -> None:
        if is_finite_number(value):
            above = value > self.lo if self.lo_open else value >= self.lo
            below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
            if above and below:
                return
        accepted = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            accepted += f" and {'<' if self.hi_open else '<='} {self.hi:g}"
        why = f" ({self.why})" if self.why else ""
        raise InputError(f"{name} must be a finite number {accepted}{why}, got {value!r}")


@dataclass(frozen=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]
    prefix: str = ""

    def check(self, name: str, value: Any) -> None:
        if isinstance(value, str) and value in self.choices:
            return
        quoted = [repr(c) for c in self.choices]
        alternatives = (
            ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
        )
        raise InputError(f"{name} must be {self.prefix}{alternatives}, got {value!r}")


@dataclass(frozen=True)
class ListOf:
    """A list of ``lo`` to ``hi`` items, each checked by ``item`` (named ``field[i]``)."""

    item: Real
    lo: int
    hi: int
    what: str

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, list) or not self.lo <= len(value) <= self.hi:
            raise InputError(
                f"{name} must be a list of {self.what} ({self.lo} to {self.hi} of them), "
                f"got {value!r}"
            )
        for i, v in enumerate(value):
            try:
                self.item.check(f"{name}[{i}]", v)
            except InputError as exc:
                raise InputError(f"{name} must be a list of {self.what}: {exc}") from None


@dataclass(frozen=True)
class TextNames:
    """A list of distinct names of offline texts (:mod:`prosparse_fx.texts`): out-of-domain
    evaluation texts (``out_of_domain``) or texts that may be trained on."""

    out_of_domain: bool

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{name} must be a list of text names, got {value!r}")
        if len(set(value)) != len(value):
            raise InputError(f"{name} names a text twice: {value!r}")
        check_text_names(value, field=name, out_of_domain=self.out_of_domain)


@dataclass(frozen=True)
class Stages:
    """``[[lambda, end_step], ...]``: 1 to :data:`MAX_STAGES` pairs, each lambda a finite
    number >= 0, each end step a whole number in ``[1, MAX_STEPS]``, strictly increasing."""

    lam: Real = Real(0.0)
    end: Whole = Whole(1, MAX_STEPS, why="a cumulative optimizer step")

    def check(self, name: str, value: Any) -> None:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_STAGES:
            raise InputError(
                f"{name} must be a list of [lambda, end_step] pairs (at least 1, at most "
                f"{MAX_STAGES}), got {value!r}"
            )
        previous = None
        for i, stage in enumerate(value):
            if not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise InputError(f"{name}[{i}] must be a [lambda, end_step] pair, got {stage!r}")
            self.lam.check(f"{name}[{i}] lambda", stage[0])
            self.end.check(f"{name}[{i}] end step", stage[1])
            if previous is not None and stage[1] <= previous:
                raise InputError(
                    f"{name}[{i}] end step must be greater than {name}[{i - 1}]'s ({previous}): "
                    f"end steps are cumulative and strictly increasing, got {stage[1]!r}"
                )
            previous = stage[1]


FIELD_RULES: dict[str, Whole | Real | OneOf | ListOf | Stages | TextNames] = {
    "stages": Stages(),
    "max_steps": Whole(1, MAX_STEPS, optional=True),
    "seq_len": Whole(2, 1 << 20, why="tokens per window; 2 give one next-token target"),
    "batch_size": Whole(1, 1 << 16),
    "lr": Real(0.0, 1.0, lo_open=True, why="a larger step overflows AdamW's update"),
    "warmup_steps": Whole(0, MAX_STEPS),
    "weight_decay": Real(
        0.0, 1.0, why="AdamW scales the weights by 1 - lr * weight_decay at each step"
    ),
    "norm": OneOf(L1_NORMS, prefix="one of "),
    "activation": OneOf(("relu", "drelu")),
    "threshold_mode": OneOf(("fixed", "target", "budget", "none")),
    "threshold_scope": OneOf(("model", "layer")),
    "threshold": Real(0.0),
    "target_sparsity": Real(0.0, 1.0, hi_open=True),
    "threshold_budget": Real(1.0, 100.0, why="a perplexity ratio over the unshifted model"),
    "sweep_thresholds": ListOf(Real(0.0), 0, 1000, "numbers >= 0"),
    "eval_windows": Whole(1, 1_000_000),
    "calib_windows": Whole(1, 1_000_000),
    "seed": Whole(0, 2**32 - 1, why="2**32 - 1 is the largest seed numpy accepts"),
    "precision": OneOf(("auto", "bf16", "fp32")),
    "checkpoint_every": Whole(1, MAX_STEPS),
    "lr_decay": OneOf(LR_DECAYS),
    "min_lr_ratio": Real(0.0, 1.0),
    "distill": Real(0.0, 1.0, why="the KL's weight; the LM loss gets 1 - distill"),
    "distill_temperature": Real(0.0, 100.0, lo_open=True),
    "substitution": Real(0.0, 1.0, why="a fraction of stage 0"),
    "refit_windows": Whole(0, 1_000_000),
    "refit_ridge": Real(0.0, 1e6, lo_open=True, why="relative to the mean of diag(x1^T x1)"),
    "train_texts": TextNames(out_of_domain=False),
    "eval_texts": TextNames(out_of_domain=True),
}
"""The rule of each :class:`SparsifyConfig` field: the one place that says its type, whether it
is a whole number, that it is finite, and its range."""


PRESETS: dict[str, dict[str, Any]] = {
    # Ends in under 15 minutes on 2 CPU cores (measured; see README).
    "default": {},
    # The long version: about 2.5 hours in the background on 2 CPU cores (run whole once:
    # 2 h 36 min on an AMD EPYC, README), resumable; 2.6x the default's steps at 4x the tokens
    # per step, with the quality options.
    "long": {
        "stages": [[0.0, 260], [0.05, 310], [0.12, 440], [0.12, 520]],
        "batch_size": 8,
        "seq_len": 256,
        "eval_windows": 64,
        "calib_windows": 32,
        "lr": 3e-4,
        "lr_decay": "cosine",
        "distill": 0.5,
        "substitution": 0.5,
        "train_texts": ["news"],
    },
}
