"""The plots of a sparsify run (matplotlib, Agg backend), each written whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_file


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
