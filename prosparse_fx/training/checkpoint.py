"""The training state in a checkpoint of the main job: optimizer, LR schedule, step, RNG, data
position and what was measured so far, and the checks that a state read back is one this run
could have written (values, not only keys) before a resumed run trusts it.

Where checkpoints live and how they are written whole: :mod:`prosparse_fx.run_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import is_finite_number, is_whole_number
from ..errors import InputError
from ..run_folder import STATE_FILE
from .schedule import ProSparseSchedule

STATE_KEYS = ("step", "optimizer", "lr_schedule", "data", "rng", "history", "stage_ends", "report")


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder (``torch.load(weights_only=True)``: no code
    runs from the file).

    Raises:
        InputError: the file cannot be read, or it is not a dict with every key of
            :data:`STATE_KEYS`; the message says to delete the checkpoint.
    """
    fix = f"; delete {folder} and start a new run"
    try:
        state = torch.load(Path(folder) / STATE_FILE, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read the checkpoint in {folder} ({reason}){fix}") from exc
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise InputError(f"{folder} is not a complete prosparse-fx sparsify checkpoint{fix}")
    return state


def check_state(state: dict[str, Any], schedule: ProSparseSchedule, folder: Path) -> None:
    """Check the values of a training state against the run's schedule, and decode its JSON
    parts in place (``history``, ``stage_ends``).

    A state passes when: ``step`` is a whole number in ``[0, total steps]``; ``history`` holds
    one finite log per step, numbered ``1..step``; ``stage_ends`` lists the first ``k`` stages
    in order, each at its schedule end, with ``k`` the number of stage ends at or before
    ``step`` (or one fewer, when a stop came after a stage's last step but before its
    measurement), each with finite measurements; ``rng`` is a CPU generator state; the
    optimizer and LR-schedule states are dicts, and the data position a dict.

    Raises:
        InputError: the first value that fails, named, with the fix (delete the checkpoint).
    """
    fix = f"; the checkpoint in {folder} is damaged or forged: delete it and start a new run"
    step = state["step"]
    total = schedule.total_steps
    if not is_whole_number(step) or not 0 <= step <= total:
        raise InputError(f"checkpoint step {step!r} is not a whole number in [0, {total}]{fix}")
    try:
        history = json.loads(state["history"])
        stage_ends = json.loads(state["stage_ends"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"checkpoint history/stage_ends are not JSON ({exc}){fix}") from exc
    if not isinstance(history, list) or len(history) != step:
        n = len(history) if isinstance(history, list) else type(history).__name__
        raise InputError(f"checkpoint history holds {n} steps, its step is {step}{fix}")
    for i, entry in enumerate(history, 1):
        if (
            not isinstance(entry, dict)
            or entry.get("step") != i
            or not all(is_finite_number(entry.get(k)) for k in ("lam", "lm_loss", "l1", "sparsity"))
        ):
            raise InputError(f"checkpoint history entry {i} is not a finite log of step {i}{fix}")
    done = sum(1 for end in schedule.ends if end <= step)
    if not isinstance(stage_ends, list) or len(stage_ends) not in (done, done - 1):
        raise InputError(
            f"checkpoint stage_ends {str(stage_ends)[:80]} do not match step {step} of stage "
            f"ends {list(schedule.ends)}{fix}"
        )
    for i, entry in enumerate(stage_ends):
        if (
            not isinstance(entry, dict)
            or entry.get("stage") != i
            or entry.get("step") != schedule.ends[i]
            or not is_finite_number(entry.get("perplexity"))
            or not is_finite_number(entry.get("sparsity"))
        ):
            raise InputError(
                f"checkpoint stage_ends[{i}] is not the measurement of stage {i} at step "
                f"{schedule.ends[i]}{fix}"
            )
    rng = state["rng"]
    like = torch.get_rng_state()
    if not (isinstance(rng, torch.Tensor) and rng.dtype == like.dtype and rng.shape == like.shape):
        raise InputError(f"checkpoint rng is not a CPU generator state{fix}")
    for key in ("optimizer", "lr_schedule", "data"):
        if not isinstance(state[key], dict):
            raise InputError(f"checkpoint {key} is a {type(state[key]).__name__}, not a state{fix}")
    state["history"], state["stage_ends"] = history, stage_ends


def check_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> None:
    """Check an AdamW state loaded from a checkpoint after ``step`` steps: after a first step
    it holds moments, each of its parameter's shape and finite, and every learning rate is
    finite.

    Raises:
        InputError: the first entry that fails, named (a damaged or forged checkpoint).
    """
    fix = "; the checkpoint is damaged or forged: delete it and start a new run"
    if step > 0 and not any(
        optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]
    ):
        raise InputError(f"checkpoint optimizer state is empty after {step} steps{fix}")
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if not is_finite_number(float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None):
            raise InputError(f"checkpoint optimizer lr {lr!r} is not a finite number{fix}")
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                local = value.to_local() if hasattr(value, "to_local") else value
                if key != "step" and value.shape != param.shape:
                    raise InputError(
                        f"checkpoint optimizer {key} has shape {tuple(value.shape)}, its "
                        f"parameter {tuple(param.shape)}{fix}"
                    )
                if not bool(torch.isfinite(local).all()):
                    raise InputError(f"checkpoint optimizer {key} is not finite{fix}")
