"""The output folder of ``prosparse-fx sparsify``: one writer at a time, training checkpoints that
always leave one complete state, and a final result that appears whole.

Layout of a run folder ``OUT`` (all writes go through :mod:`prosparse_fx.atomic`):

- ``checkpoint/NNNN-step-S/``: a training checkpoint after optimizer step ``S`` (the model as
  a Hugging Face folder plus ``training_state.pt``), renamed into place once complete; the
  highest ``NNNN`` is the latest. An older one is removed only after its successor is in place.
- the final result: the model's files, ``report.json``, ``training.png`` and
  ``per_layer_sparsity.png``. It is written whole into a staging folder, which is renamed to
  ``.prosparse-commit`` (the journal), then its entries are moved into ``OUT`` (``report.json``
  last), and only then are the checkpoints removed. A run killed during the moves is completed
  by the next ``--resume``; until then readers refuse the folder, naming that command.
- ``previous-run/``: with ``--overwrite``, the earlier run's files (its report, checkpoints and
  the result files its report lists under ``"files"``), set aside (never mixed with the new
  run's) and removed once the new result is in place. Other files in the folder stay.
- ``.prosparse-tmp-*``: temporaries of a writer; ignored, and removed by the next run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .atomic import (
    clean_leftovers,
    failpoint,
    fsync_path,
    fsync_tree,
    is_temp,
    remove,
    temporary,
    write_error,
    write_json,
)
from .errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: runs are not locked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoint"
STATE_FILE = "training_state.pt"
JOURNAL = ".prosparse-commit"
SET_ASIDE = ".prosparse-set-aside"  # the earlier run's files while they are being moved aside
_SET_ASIDE_NAMES = ".names.json"  # in SET_ASIDE: what is being moved
PREVIOUS = "previous-run"
REPORT = "report.json"
# entries that only a sparsify run writes: --overwrite replaces a folder holding one of them
RUN_MARKERS = (REPORT, CHECKPOINTS, PREVIOUS, JOURNAL, SET_ASIDE)
# temporaries of earlier versions of this library
_LEGACY_TEMP = re.compile(r"^\.(save|checkpoint)-")
_GENERATION = re.compile(r"^(\d+)-step-(\d+)$")


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not a writer's temporaries (nor a ``checkpoint``
    folder holding only temporaries: a run killed during its first checkpoint)."""
    found = []
    for e in Path(folder).iterdir():
        if is_temp(e) or _LEGACY_TEMP.match(e.name):
            continue
        if e.name == CHECKPOINTS and e.is_dir() and all(is_temp(c) for c in e.iterdir()):
            continue
        found.append(e)
    return sorted(found)


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds an earlier sparsify run (its report, checkpoints or journal)."""
    return any((Path(folder) / name).exists() for name in RUN_MARKERS)


def _check_name_lengths(p: Path) -> None:
    limit = 255
    for parent in p.parents:
        try:
            if parent.is_dir():
                limit = os.pathconf(parent, "PC_NAME_MAX")
                break
        except (OSError, ValueError):
            continue
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise InputError(
                f"the output folder name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; "
                f"this file system allows {limit}: give a shorter --out"
            )


def check_output_dir(out: str | Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Check the output folder can be written, before any long work; create nothing.

    Raises:
        InputError: ``out`` exists and is not empty (without ``overwrite``), holds files that no
            sparsify run wrote (with ``overwrite``: they would be lost), is a file, is (or
            contains, or is inside) an input, has a name too long for the file system, or
            cannot be written.
    """
    try:
        str(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"the output folder name {str(out)!r} is not UTF-8 text (a byte the file system "
            "name could not decode); use a UTF-8 name for --out"
        ) from exc
    try:
        _check_name_lengths(Path(out).expanduser().absolute())  # before resolve() stats it
        p = Path(out).expanduser().resolve()
        for inp in inputs:
            ri = inp.resolve()
            if p == ri or ri.is_relative_to(p) or p.is_relative_to(ri):
                raise InputError(f"output folder {p} overlaps the input {ri}; choose another --out")
        if p.exists() and not p.is_dir():
            raise InputError(f"output path {p} is a file; pass a folder")
        if p.exists() and not os.access(p, os.R_OK | os.X_OK):
            raise InputError(
                f"cannot read the output folder {p}; fix its permissions or give another"
            )
        if p.exists():
            _check_replaceable(p, overwrite)
        existing = p
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"cannot write to output folder {p}: {existing} is not writable")
    except OSError as exc:
        raise InputError(f"cannot use the output folder {out}: {exc.strerror or exc}") from exc
    return p


def _check_replaceable(p: Path, overwrite: bool) -> None:
    found = entries(p)
    if not found:
        return
    if not overwrite:
        raise InputError(
            f"output folder {p} exists and is not empty; pass --overwrite (to replace an earlier "
            "run there) or another --out"
        )
    if not is_run_folder(p):
        shown = ", ".join(e.name for e in found[:5]) + (" ..." if len(found) > 5 else "")
        raise InputError(
            f"output folder {p} holds files that no sparsify run wrote ({shown}); --overwrite "
            "replaces only an earlier run's folder. Give an empty or new --out"
        )


@contextlib.contextmanager
def folder_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself, so no file is
    added; the system releases it when the process ends, however it ends).

    Two runs writing one folder would mix their checkpoints and report; the second is refused.

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


def check_complete(folder: Path) -> None:
    """Refuse to read a run folder whose final save was interrupted.

    Raises:
        InputError: ``folder`` holds the journal of an unfinished final save (the message names
            the ``--resume`` command that finishes it) or of an unfinished ``--overwrite``.
    """
    if (Path(folder) / SET_ASIDE).is_dir():
        raise InputError(
            f"{folder} is being replaced by a sparsify --overwrite run that was interrupted "
            "while it set the earlier run aside; run that command again to finish"
        )
    if (Path(folder) / JOURNAL).is_dir():
        raise InputError(
            f"the final save of the sparsify run in {folder} was interrupted, so its files are "
            f"not all in place; finish it with `prosparse-fx sparsify --resume {folder}`"
        )


class RunFolder:
    """The output folder of one sparsify run, held by this process (see the module docstring).

    Use :meth:`open_new` or :meth:`open_existing`; all methods write only on the main process
    (``is_main``), so every process of a torchrun job can call them.
    """

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def open_new(
        cls, out: Path, overwrite: bool, inputs: list[Path], is_main: bool = True
    ) -> Iterator[RunFolder]:
        """Create (or take over, with ``overwrite``) the folder ``out`` and hold its lock.

        The emptiness check is repeated under the lock, so a second run started meanwhile
        cannot slip in. With ``overwrite``, the earlier run's files are set aside in
        ``previous-run/``. If the run fails before writing anything, a folder it created is
        removed again.

        Raises:
            InputError: see :func:`check_output_dir`; another run holds the folder.
        """
        path = check_output_dir(out, overwrite, inputs)
        created = not path.exists()
        run = cls(path, is_main)
        if not is_main:
            yield run
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder {path}: {exc.strerror}") from exc
        ok = False
        try:
            with folder_lock(path):
                run._clean()
                _check_replaceable(path, overwrite)  # again, now that no other run can write
                if overwrite:
                    run._recover_set_aside()
                    run._finish_journal()  # an interrupted earlier result, now complete
                    run._set_aside()
                yield run
                ok = True
        finally:
            if not ok and created:
                with contextlib.suppress(OSError):
                    path.rmdir()  # only if nothing was written

    @classmethod
    @contextlib.contextmanager
    def open_existing(cls, out: Path, is_main: bool = True) -> Iterator[RunFolder]:
        """Hold the lock of the existing run folder ``out`` (``--resume``), remove the
        temporaries of a killed run and finish an interrupted final save.

        Raises:
            InputError: ``out`` is not a folder; another run holds it.
        """
        path = Path(out).expanduser().resolve()
        if not path.is_dir():
            raise InputError(f"nothing to resume: {out} is not a folder")
        run = cls(path, is_main)
        if not is_main:
            yield run
            return
        with folder_lock(path):
            run._clean()
            run._recover_set_aside()
            run._finish_journal()
            yield run

    def _clean(self) -> None:
        for folder in (self.path, self.path / CHECKPOINTS):
            for entry in clean_leftovers(folder, every=True):
                log.info("removed %s, left by a killed run", entry)
        for entry in self.path.iterdir():
            if _LEGACY_TEMP.match(entry.name):
                remove(entry)
        with contextlib.suppress(OSError):
            (self.path / CHECKPOINTS).rmdir()  # only if empty

    # -- --overwrite: the earlier run set aside --------------------------------------------------

    def _run_entries(self) -> list[Path]:
        """The entries here that a run wrote: its report, checkpoints and journals, and the
        result files its ``report.json`` lists under ``"files"`` (other files stay)."""
        names = set(RUN_MARKERS) - {PREVIOUS, SET_ASIDE}
        with contextlib.suppress(OSError, ValueError):
            report = json.loads((self.path / REPORT).read_text(encoding="utf-8"))
            files = report.get("files") if isinstance(report, dict) else None
            if isinstance(files, list):
                names |= {f for f in files if isinstance(f, str) and "/" not in f}
        return [e for e in entries(self.path) if e.name in names]

    def _set_aside(self) -> None:
        """Move the earlier run's entries into ``previous-run/`` (journaled: a kill midway is
        finished by the next run that takes the folder). Files no run wrote stay in place."""
        current = self._run_entries()
        if (self.path / PREVIOUS).exists():
            # the last complete result is already aside; what is here is an unfinished run's
            for entry in current:
                remove(entry)
            return
        if not current:
            return
        aside = self.path / SET_ASIDE
        aside.mkdir(exist_ok=True)
        write_json(aside / _SET_ASIDE_NAMES, [e.name for e in current])
        fsync_path(self.path)
        self._recover_set_aside()

    def _recover_set_aside(self) -> None:
        aside = self.path / SET_ASIDE
        if not aside.is_dir():
            return
        try:
            names = json.loads((aside / _SET_ASIDE_NAMES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            names = [e.name for e in self._run_entries()]  # killed before the list was written
        for name in names:
            entry = self.path / name
            if name not in (SET_ASIDE, PREVIOUS) and (entry.exists() or entry.is_symlink()):
                os.replace(entry, aside / name)
                failpoint("set_aside.moved")
        (aside / _SET_ASIDE_NAMES).unlink(missing_ok=True)
        fsync_path(self.path)
        os.replace(aside, self.path / PREVIOUS)
        fsync_path(self.path)

    # -- checkpoints ----------------------------------------------------------------------------

    def _generations(self) -> list[tuple[int, Path]]:
        folder = self.path / CHECKPOINTS
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            m = _GENERATION.match(entry.name)
            if m and (entry / STATE_FILE).is_file():
                found.append((int(m.group(1)), entry))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        """The latest complete checkpoint folder, or ``None``. A checkpoint written by an
        earlier version (``checkpoint/training_state.pt``) counts as the oldest."""
        generations = self._generations()
        if generations:
            return generations[-1][1]
        legacy = self.path / CHECKPOINTS
        return legacy if (legacy / STATE_FILE).is_file() else None

    def save_checkpoint(
        self, step: int, write_model: Callable[[Path], None], state: dict[str, Any]
    ) -> Path | None:
        """Write a checkpoint after ``step``: ``write_model(folder)`` writes the model into a
        temporary folder, ``state`` (what ``torch.load(weights_only=True)`` reads) goes to
        ``training_state.pt``; the folder is renamed into place, then older checkpoints are
        removed.

        Returns:
            The new checkpoint folder (``None`` on processes other than the main one).

        Raises:
            OutputWriteError: the checkpoint could not be written (a full disk, ...); the
                message names the free space and the complete checkpoint that was kept.
        """
        if not self.is_main:
            return None
        folder = self.path / CHECKPOINTS
        before = self._generations()
        legacy = (folder / STATE_FILE).is_file()
        number = before[-1][0] + 1 if before else 1
        name = f"{number:04d}-step-{step}"
        try:
            folder.mkdir(exist_ok=True)
            with temporary(folder, name, folder=True) as tmp:
                write_model(tmp)
                failpoint("checkpoint.model_written")
                torch.save(state, tmp / STATE_FILE)
                fsync_tree(tmp)
                failpoint("checkpoint.state_written")
                os.rename(tmp, folder / name)
                fsync_path(folder)
                failpoint("checkpoint.in_place")
        except (OSError, RuntimeError) as exc:
            kept = self.latest_checkpoint()
            raise write_error(
                exc,
                f"the checkpoint after step {step}",
                folder,
                f"The last complete checkpoint is kept ({kept}); continue with "
                f"`prosparse-fx sparsify --resume {self.path}`"
                if kept
                else "No earlier checkpoint exists.",
            ) from exc
        for _number, old in before:
            remove(old)
            failpoint("checkpoint.old_removed")
        if legacy:
            (folder / STATE_FILE).unlink()
            for entry in folder.iterdir():
                if not _GENERATION.match(entry.name):
                    remove(entry)
        return folder / name

    # -- the result ------------------------------------------------------------------------------

    def write_report(self, report: dict[str, Any]) -> None:
        """Write ``report.json`` on its own (a run that stopped without a result)."""
        if self.is_main:
            write_json(self.path / REPORT, report)

    def commit(self, write_result: Callable[[Path], None]) -> None:
        """Put the final result in place whole: ``write_result(folder)`` writes every file of it
        (model, tokenizer, report, plots) into a staging folder; then the journal is renamed
        into place, its entries are moved into the run folder (the report last), and the
        checkpoints and an earlier run set aside are removed.

        Raises:
            OutputWriteError: the result could not be written; the checkpoints are kept.
        """
        if not self.is_main:
            return
        try:
            with temporary(self.path, "result", folder=True) as staging:
                write_result(staging)
                fsync_tree(staging)
        except (OSError, RuntimeError) as exc:
            kept = self.latest_checkpoint()
            raise write_error(
                exc,
                "the final model and report",
                self.path,
                f"The last checkpoint is kept ({kept}); continue with "
                f"`prosparse-fx sparsify --resume {self.path}`"
                if kept
                else "",
            ) from exc
        failpoint("result.staged")
        os.rename(staging, self.path / JOURNAL)
        fsync_path(self.path)
        failpoint("result.journaled")
        self._finish_journal()

    def _finish_journal(self) -> bool:
        """Move the journal's entries into place (the report last), remove the checkpoints and
        the earlier run set aside, then the journal. Returns whether there was a journal."""
        journal = self.path / JOURNAL
        if not journal.is_dir():
            return False
        moving = sorted(journal.iterdir(), key=lambda e: (e.name == REPORT, e.name))
        for entry in moving:
            target = self.path / entry.name
            if entry.is_dir() and target.exists():
                remove(target)
            os.replace(entry, target)
            failpoint("result.moved")
        fsync_path(self.path)
        remove(self.path / CHECKPOINTS)
        failpoint("result.checkpoints_removed")
        remove(self.path / PREVIOUS)
        journal.rmdir()
        fsync_path(self.path)
        return True
