"""Approximate mode end to end on the main job's model: greedy decoding tokens/s of the dense,
the exact sparse (``sparsify_ffn_``) and the predicted (``sparsify_ffn_(predictors=...)``)
model, the held-out perplexity of each on the same windows, the per-layer recall of the
predictors on the held-out text, and for the SVD kind a sweep of the rank (held-out recall,
predicted sparsity and perplexity against rank, the cut calibrated to the same target recall).

The predictors are built here on the calibration split of the text (the document split of
``prosparse-fx sparsify``, seed 0) and measured on its held-out split; the model folder is not
written to. Decoding is timed interleaved, median of ``--repeats`` after one warm-up. Prints a
table, writes JSON and a plot (rank sweep), and records the machine.

    python benchmarks/bench_predicted_decode.py --model runs/default --rank 126 --kind trained
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import prosparse_fx  # noqa: E402,F401  (registers hidden_act="fatrelu")
from prosparse_fx import find_ffn_sites  # noqa: E402
from prosparse_fx.data import load_documents, split_documents, spread, token_windows  # noqa: E402
from prosparse_fx.measure import perplexity  # noqa: E402
from prosparse_fx.models import load_model  # noqa: E402
from prosparse_fx.predictors import TrainingConfig, build_predictors  # noqa: E402
from prosparse_fx.predictors.job import approximate_mode_report  # noqa: E402
from prosparse_fx.sparse_modules import sparsify_ffn_  # noqa: E402

PROMPT = "The history of the city begins in the early Middle Ages, when"
SWEEP = (16, 32, 63, 126, 252, 576)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/default"))
    p.add_argument("--kind", default="trained", choices=("svd", "trained"))
    p.add_argument("--rank", type=int, default=126)
    p.add_argument("--recall", type=float, default=0.99)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--held-out-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sweep", type=int, nargs="*", default=list(SWEEP), help="SVD ranks")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    torch.manual_seed(0)
    dense, tok = load_model(args.model)
    dense.eval()
    sites = find_ffn_sites(dense)
    split = split_documents(load_documents(None), seed=0)
    calib = spread(token_windows(tok, split.calib, args.seq_len), args.calib_windows)
    held = spread(token_windows(tok, split.held_out, args.seq_len), args.held_out_windows)
    d, d_ff = sites[0].hidden_size, sites[0].intermediate_size

    def quality(kind: str, rank: int) -> tuple[list, dict]:
        built = build_predictors(
            dense, calib, sites, kind=kind, rank=rank, recall=args.recall,
            training=TrainingConfig(),
        )  # fmt: skip
        return built, approximate_mode_report(dense, built, held, sites)

    predictors, report = quality(args.kind, args.rank)
    exact, predicted = copy.deepcopy(dense), copy.deepcopy(dense)
    sparsify_ffn_(exact, sites=sites)
    sparsify_ffn_(predicted, sites=sites, predictors=predictors)
    ids = tok(args.prompt, return_tensors="pt").input_ids

    def generate(model):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                  min_new_tokens=args.new_tokens)  # fmt: skip

    out = {name: generate(m) for name, m in (("dense", dense), ("predicted", predicted))}
    ms = time_interleaved(
        {"dense": lambda: generate(dense), "exact": lambda: generate(exact),
         "predicted": lambda: generate(predicted)},
        "cpu", args.repeats, warmup=1,
    )  # fmt: skip
    n = args.new_tokens
    same = int((out["dense"] == out["predicted"]).all(0).int().cumprod(0).sum()) - ids.shape[1]
    exact_ppl = perplexity(exact, held)
    n_ms = ", ".join(f"{k} {n / (v / 1e3):.2f}" for k, v in ms.items())
    print(f"decoding tokens/s: {n_ms}", flush=True)  # before the (long) sweep

    sweep = []
    for rank in args.sweep:
        if rank > min(d, d_ff):
            continue
        built, r = quality("svd", rank)
        held_sites = r["sites"]
        sweep.append(
            {
                "rank": rank,
                "byte_share_of_ffn": rank * (d + d_ff) / (3 * d * d_ff),
                "held_out_recall": sum(e["recall"] for e in held_sites) / len(held_sites),
                "held_out_predicted_sparsity": sum(e["predicted_sparsity"] for e in held_sites)
                / len(held_sites),
                "perplexity_ratio": r["perplexity_ratio"],
            }
        )
        print(f"svd rank {rank:4d}: {sweep[-1]}", flush=True)

    held_sites = report["sites"]
    result = {
        "model": str(args.model),
        "kind": args.kind,
        "rank": args.rank,
        "recall_target": args.recall,
        "calibration_windows": int(calib.shape[0]),
        "held_out_windows": int(held.shape[0]),
        "seq_len": args.seq_len,
        "new_tokens": n,
        "tokens_per_s": {k: n / (v / 1e3) for k, v in ms.items()},
        "speedup_vs_dense": {k: ms["dense"] / v for k, v in ms.items()},
        "perplexity": {
            "dense": report["perplexity_exact"],
            "exact": exact_ppl,
            "predicted": report["perplexity_predicted"],
        },
        "perplexity_ratio": report["perplexity_ratio"],
        "greedy_tokens_equal_to_dense": same,
        "held_out_per_layer": held_sites,
        "held_out_recall": sum(e["recall"] for e in held_sites) / len(held_sites),
        "held_out_predicted_sparsity": sum(e["predicted_sparsity"] for e in held_sites)
        / len(held_sites),
        "held_out_true_sparsity": sum(e["true_sparsity"] for e in held_sites) / len(held_sites),
        "calibration_recall": sum(q.recall for q in predictors) / len(predictors),
        "svd_rank_sweep": sweep,
        "machine": machine(),
    }
    print(f"{'model':10s} {'tokens/s':>9s} {'x dense':>8s} {'held-out ppl':>13s}")
    for name in ("dense", "exact", "predicted"):
        print(
            f"{name:10s} {result['tokens_per_s'][name]:9.2f} "
            f"{result['speedup_vs_dense'][name]:8.3f} {result['perplexity'][name]:13.3f}"
        )
    print(
        f"{args.kind} rank {args.rank}, recall target {args.recall}: held-out recall "
        f"{result['held_out_recall']:.4f}, predicted sparsity "
        f"{result['held_out_predicted_sparsity']:.4f} "
        f"(true {result['held_out_true_sparsity']:.4f}); the first {same} of {n} greedy "
        "tokens equal the dense model's"
    )
    write_json(args.out / "predicted_decode_cpu.json", result)
    if sweep:
        plot(sweep, args, args.out / "predicted_rank_sweep_cpu.png")


def plot(sweep: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [e["rank"] for e in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ranks, [e["held_out_recall"] for e in sweep], "o-", label="held-out recall")
    ax1.plot(
        ranks, [e["held_out_predicted_sparsity"] for e in sweep], "s-",
        label="held-out predicted sparsity",
    )  # fmt: skip
    ax1.axhline(args.recall, color="grey", ls=":", label=f"target recall {args.recall}")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("SVD predictor rank")
    ax1.legend(fontsize=8)
    ax2.plot(ranks, [e["perplexity_ratio"] for e in sweep], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("SVD predictor rank")
    ax2.set_ylabel("held-out perplexity, approximate / exact")
    fig.suptitle(f"{args.model.name}: SVD predictors, cut at recall {args.recall} (calibration)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


if __name__ == "__main__":
    main()
