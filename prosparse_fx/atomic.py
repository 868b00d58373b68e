"""Crash-consistent writes: every file or folder this library writes appears whole or not at all.

One pattern, used by the run folder of ``sparsify`` (checkpoints, the final result), ``export``
(ONNX files) and the GGUF conversion cache: write into a temporary entry beside the target,
flush it to disk (``fsync``), then rename it into place (``rename`` is atomic within one file
system) and flush the folder so the rename survives a power cut. A killed writer leaves only
temporary entries, whose names start with :data:`TEMP_PREFIX` and hold the writer's process id;
readers ignore them and the next writer removes those whose process is gone
(:func:`clean_leftovers`).

Fault injection (for the crash-consistency tests): :func:`failpoint` marks each step of a write
sequence; setting ``PROSPARSE_FX_FAILPOINT=NAME[@N][:ACTION]`` makes the ``N``-th pass (default
the first) through the point ``NAME`` send the process SIGKILL (``kill``, the default) or
SIGTERM (``term``), or raise :class:`SimulatedCrash` (``raise``, in-process tests: it is a
``BaseException`` that the writers here do not clean up after, so the files on disk are those a
kill at that point leaves).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError

TEMP_PREFIX = ".prosparse-tmp-"
FAILPOINT_ENV = "PROSPARSE_FX_FAILPOINT"

_failpoint_hits: dict[str, int] = {}  # passes through each failpoint in this process
_writing: set[str] = set()  # names of this process's temporaries whose write is under way


class SimulatedCrash(BaseException):
    """Raised by :func:`failpoint` with the ``raise`` action: a crash at that point, without
    the clean-up a normal error runs."""


class OutputWriteError(InputError):
    """An output could not be written (no space left, no permission, a name too long...); the
    message names the path, the reason and what was kept."""


def failpoint(name: str) -> None:
    """A step of a write sequence at which the crash tests stop the process (see the module
    docstring); does nothing unless ``PROSPARSE_FX_FAILPOINT`` names this point."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec:
        return
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
    if _failpoint_hits[name] != int(nth or 1):
        return
    if action in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "raise":
        raise SimulatedCrash(name)
    else:
        raise ValueError(f"{FAILPOINT_ENV}: unknown action {action!r} (kill, term or raise)")


def reset_failpoints() -> None:
    """Forget the passes counted by :func:`failpoint` (tests run several crashes in one process)."""
    _failpoint_hits.clear()


def temp_path(parent: Path, name: str) -> Path:
    """A fresh temporary path in folder ``parent`` for a write whose target is called ``name``."""
    return Path(parent) / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name}"


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a temporary entry of a writer (see :data:`TEMP_PREFIX`)."""
    return Path(path).name.startswith(TEMP_PREFIX)


def _writer_alive(path: Path) -> bool:
    pid_text = Path(path).name[len(TEMP_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return Path(path).name in _writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove(path: Path) -> None:
    """Remove a file or folder tree; a missing one is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_leftovers(folder: Path, *, every: bool = False) -> list[Path]:
    """Remove the temporary entries in ``folder`` that killed writers left.

    Args:
        folder: the folder (a missing one holds nothing).
        every: remove all of them (the caller holds the folder's lock, so no other writer is
            live in it); by default only those whose writer process is gone.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if is_temp(entry) and (every or not _writer_alive(entry)):
            remove(entry)
            removed.append(entry)
    return removed


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folders themselves."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for f in files:
                fsync_path(Path(root) / f)
            fsync_path(Path(root))
    else:
        fsync_path(path)


def write_error(exc: OSError | RuntimeError, what: str, path: Path, kept: str) -> OutputWriteError:
    """An :class:`OutputWriteError` for a failed write of ``what`` at ``path``, naming the
    reason (free space when the disk is full) and what was kept."""
    free = None
    with contextlib.suppress(OSError):
        existing = Path(path)
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20)
    reason = (
        f"no space left on the device ({free / 2**20:.0f} MiB free); free some space"
        if full and free is not None
        else (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    )
    return OutputWriteError(f"cannot write {what} to {path}: {reason}. {kept}")


@contextlib.contextmanager
def temporary(parent: Path, name: str, *, folder: bool = False) -> Iterator[Path]:
    """A temporary entry in ``parent`` for a write whose target is called ``name`` (a folder
    if ``folder``), marked as being written by this process while the block runs, and removed
    if the block fails; the block renames it into place on success. A crash (a kill, or
    :class:`SimulatedCrash`) leaves it for :func:`clean_leftovers`.
    """
    tmp = temp_path(parent, name)
    _writing.add(tmp.name)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
    except Exception:
        remove(tmp)
        raise
    finally:
        _writing.discard(tmp.name)


@contextlib.contextmanager
def atomic_file(target: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Write a file ``target`` whole or not at all.

    Yields a temporary path in the same folder; the caller writes the file there. On success it
    is flushed and renamed to ``target``. On an error it is removed and ``target`` is unchanged.

    Args:
        target: the file to write.
        overwrite: replace an existing ``target``; if ``False``, a ``target`` that another
            writer created meanwhile is kept and :class:`OutputWriteError` is raised.

    Raises:
        OutputWriteError: ``overwrite=False`` and ``target`` exists.
    """
    target = Path(target)
    with temporary(target.parent, target.name) as tmp:
        yield tmp
        fsync_path(tmp)
        failpoint("atomic_file.written")
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails if target exists: never last-wins
            except FileExistsError:
                raise OutputWriteError(
                    f"{target} was written by another process while this one ran; kept it. "
                    "Pass overwrite (--overwrite) to replace it, or give another name"
                ) from None
            tmp.unlink()
        fsync_path(target.parent)


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented, strict JSON (NaN and infinities become ``null``, which every
    JSON parser reads) to ``path``, whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        text = json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)


@contextlib.contextmanager
def new_folder(target: Path) -> Iterator[Path]:
    """Write a folder ``target`` that does not exist yet, whole or not at all.

    Yields a temporary folder beside ``target``; on success it is flushed and renamed to
    ``target``. If another writer made ``target`` meanwhile, theirs is kept and ours removed
    (both wrote the same thing: use this for caches keyed by content).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    with temporary(target.parent, target.name, folder=True) as tmp:
        yield tmp
        fsync_tree(tmp)
        failpoint("new_folder.written")
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if not target.is_dir() or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove(tmp)  # a concurrent writer finished first
        fsync_path(target.parent)


@contextlib.contextmanager
def serialised(folder: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on ``folder`` (``flock``), so writers of the
    same outputs in it take turns instead of interleaving their renames."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: no serialisation
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
