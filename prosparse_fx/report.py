"""The report of a sparsify run: its measurements as JSON-ready dicts, and its plots
(matplotlib, Agg backend), each plot written whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_file
from .environment import machine_info


def evaluation_dict(ev: Any) -> dict[str, Any]:
    """An :class:`~prosparse_fx.measure.Evaluation` as the report writes it: perplexity,
    sparsity of x1 (0..1) and its per-layer values."""
    return {
        "perplexity": ev.perplexity,
        "sparsity": ev.sparsity.sparsity,
        "per_layer_sparsity": ev.sparsity.per_layer,
    }


def new_report(
    *,
    inputs: dict[str, Any],
    bos_id: int | None,
    data_split: dict[str, Any],
    config: dict[str, Any],
    schedule: dict[str, Any],
    sites: list[dict[str, Any]],
    training_autocast: str,
) -> dict[str, Any]:
    """The report of a run that starts: ``"status": "running"``, its inputs (paths and
    fingerprints), the BOS convention of its windows, the data split, config, schedule, FFN
    sites and machine."""
    return {
        "status": "running",
        **inputs,
        # perplexity windows start with BOS when the tokenizer adds BOS to a text
        "bos": bos_id is not None,
        "bos_token_id": bos_id,
        "data_split": data_split,
        "config": config,
        "schedule": schedule,
        "sites": sites,
        "machine": machine_info(),
        "training_autocast": training_autocast,
    }


def out_of_domain_entry(
    name: str,
    baseline: dict[str, Any],
    before_shift: dict[str, Any],
    final: dict[str, Any],
    windows: int,
) -> dict[str, Any]:
    """One out-of-domain text's entry: the original model, the trained model before the
    threshold shift and the final model (each an :func:`evaluation_dict`) on the same windows,
    and the final perplexity's ratio to the original's (the cost of training on another
    domain)."""
    return {
        "text": name,
        "windows": windows,
        "baseline": baseline,
        "before_threshold_shift": before_shift,
        "final": final,
        "perplexity_ratio": final["perplexity"] / baseline["perplexity"],
    }


def write_plots(out_dir: Path, report: dict[str, Any]) -> None:
    """``training.png`` (lambda, LM loss, sparsity over steps) and ``per_layer_sparsity.png``
    (before training, after training, after the threshold shift) of a finished run."""
    plot_training(
        out_dir / "training.png", report["history"], "lambda, LM loss and sparsity over steps"
    )
    series = {
        "ReLU, no training": report["relu_no_training"]["per_layer_sparsity"],
        "after training": report["before_threshold_shift"]["per_layer_sparsity"],
        "after threshold shift": report["per_layer_sparsity"],
    }
    plot_per_layer(out_dir / "per_layer_sparsity.png", series, "per-layer sparsity of x1")


def _savefig(fig: Any, path: Path) -> None:
    with atomic_file(path.with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.chmod(tmp, 0o644)


def plot_training(path: Path, history: Sequence[dict[str, Any]], title: str) -> None:
    """Lambda, LM loss and training-batch sparsity of x1 over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    axes[0].plot(steps, [h["lam"] for h in history], color="tab:red")
    axes[0].set_ylabel("lambda")
    axes[1].plot(steps, [h["lm_loss"] for h in history], color="tab:blue", lw=0.8)
    axes[1].set_ylabel("LM loss (nats)")
    axes[2].plot(steps, [h["sparsity"] for h in history], color="tab:green", lw=0.8)
    axes[2].set_ylabel("x1 sparsity (train batch)")
    axes[2].set_xlabel("optimizer step")
    axes[0].set_title(title)
    for ax in axes:
        ax.grid(alpha=0.3)
    _savefig(fig, path)
    plt.close(fig)


def plot_per_layer(path: Path, series: dict[str, Sequence[float]], title: str) -> None:
    """Per-layer sparsity of x1, one line per named measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, label=name)
    ax.set_xlabel("FFN layer")
    ax.set_ylabel("sparsity of x1 (held-out)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _savefig(fig, path)
    plt.close(fig)
