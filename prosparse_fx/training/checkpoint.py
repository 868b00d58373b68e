"""Training checkpoints of the main job: the model as a Hugging Face folder plus the training
state (optimizer, LR schedule, step, RNG, data position, what was measured so far), replaced
as a whole so that a kill at any moment leaves one complete checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

STATE_FILE = "training_state.pt"
log = logging.getLogger(__name__)


def save_checkpoint(
    target: Path, write_model: Callable[[Path], None], state: dict[str, Any]
) -> None:
    """Write a checkpoint folder ``target`` atomically.

    ``write_model(folder)`` writes the model (``save_pretrained``) into a fresh folder beside
    ``target``; ``state`` (tensors, numbers, strings, lists, dicts: what
    ``torch.load(weights_only=True)`` reads) goes to ``STATE_FILE`` in it. The new folder then
    replaces ``target`` by renames: ``target`` -> ``target.old``, new -> ``target``, and the old
    one is removed. :func:`find_checkpoint` also accepts ``target.old`` if a kill fell between
    the two renames.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write_model(tmp)
        torch.save(state, tmp / STATE_FILE)
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_checkpoint(target: Path) -> None:
    """Remove the checkpoint ``target``, its ``target.old`` and any half-written new folder that
    :func:`save_checkpoint` left beside it (a kill during the write)."""
    target = Path(target)
    old = target.with_name(target.name + ".old")
    for path in [target, old, *target.parent.glob(f".{target.name}-*")]:
        shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(target: Path) -> Path | None:
    """The complete checkpoint at ``target`` (or ``target.old``), or ``None``."""
    for candidate in (Path(target), Path(target).with_name(Path(target).name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder (``torch.load(weights_only=True)``)."""
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)


@contextlib.contextmanager
def run_folder_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run folder ``folder`` (``flock`` on the folder itself, so
    no file is added; the system releases it when the process ends, however it ends).

    Two runs writing one folder (a second ``--resume``, or ``--overwrite`` while a run is
    going) would mix their checkpoints and report; the second one is refused instead.

    Raises:
        InputError: another process holds the lock on ``folder``.
    """
    if not enabled or fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another prosparse-fx run is writing to {folder}; wait for it to finish (or stop "
                "it), or give another output folder"
            ) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            log.warning("cannot lock %s (%s); running without the one-writer check", folder, exc)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
