"""Approximate mode vs exact mode vs dense: one gated FFN at LLaMA-2-7B widths (CPU fp32 by
default; ``--device cuda --dtype bfloat16`` on a GPU, where the ops run the Triton kernels).

For each sparsity s (80/90/95%) and predictor rank r (about 2, 5 and 10% of the FFN's bytes) it
times, interleaved in one run (median of ``--repeats`` after warm-up):

- dense: the three matmuls (torch);
- exact: ``torch.ops.prosparse.sparse_gated_ffn``, the gate dense, up and down on the active rows;
- predicted: ``torch.ops.prosparse.predicted_gated_ffn``, the rank-r estimate, then gate, up and
  down on the predicted rows only (the predictor's cost counted);
- dejavu-torch: the same computation as Deja Vu's PyTorch code does it (index the weight rows,
  then matmuls), the peer.

Each call takes the next of 16 random inputs. The cut is the s quantile of the estimate over
them and t that of the gate, so the predicted set has the size of the active set on average.
The bound for predicted mode is ``3 / (p + 3 (1 - s))`` with p the predictor's bytes over one
matrix's; exact mode's is ``3 / (1 + 2 (1 - s))``. Prints a table, writes JSON and a plot, and
records the machine.

    python benchmarks/bench_predicted.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_interleaved, write_json  # noqa: E402

from prosparse_fx.kernels import (  # noqa: E402
    gated_ffn_reference,
    predicted_gated_ffn,
    sparse_gated_ffn,
)

WIDTHS = {"llama2-7b": (4096, 11008), "smollm2": (576, 1536)}
BYTE_SHARES = (0.02, 0.05, 0.10)  # the predictor's bytes over the whole FFN's
POOL = 16  # inputs cycled through, one per call


def rank_for(share: float, d: int, d_ff: int) -> int:
    """The rank whose factors ``[r, d]`` and ``[d_ff, r]`` hold ``share`` of the FFN's bytes."""
    return max(1, round(share * 3 * d * d_ff / (d + d_ff)))


def predicted_bound(s: float, rank: int, d: int, d_ff: int) -> float:
    """One token: dense reads 3 matrices, predicted mode the factors and 3 (1 - s) matrices."""
    p = rank * (d + d_ff) / (d * d_ff)
    return 3.0 / (p + 3.0 * (1.0 - s))


def exact_bound(s: float) -> float:
    """One token, gate dense: dense reads 3 matrices, exact sparse 1 + 2 (1 - s)."""
    return 3.0 / (1.0 + 2.0 * (1.0 - s))


def dejavu_torch(x, a, b, cut, w_gate, w_up, w_down_t, threshold):
    """Deja Vu's way in PyTorch: index the predicted rows out of each weight, then matmuls."""
    est = (x @ a.T) @ b.T
    idx = (est > cut).any(0).nonzero().squeeze(1)
    gate = x @ w_gate[idx].T
    x1 = torch.where(gate < threshold, 0.0, gate) * (x @ w_up[idx].T)
    return torch.where(est[:, idx] > cut, x1, 0.0) @ w_down_t[idx]


def _contenders(xs, a, b, cut, w_gate, w_up, w_down_t, t) -> dict:
    """The four ways of computing the FFN, as calls without arguments; each call takes the
    next input of the pool ``xs`` ``[P, tokens, d]``, so that the rows read change from call to
    call as in decoding (the same rows every call would stay in the cache)."""
    state = {"i": 0}

    def nxt() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % xs.shape[0]
        return xs[state["i"]]

    return {
        "dense": lambda: gated_ffn_reference(nxt(), w_gate, w_up, w_down_t, t),
        "exact": lambda: sparse_gated_ffn(nxt(), w_gate, w_up, w_down_t, t),
        "predicted": lambda: predicted_gated_ffn(nxt(), a, b, cut, w_gate, w_up, w_down_t, t),
        "dejavu_torch": lambda: dejavu_torch(nxt(), a, b, cut, w_gate, w_up, w_down_t, t),
    }


def _quantile(v: torch.Tensor, q: float) -> float:
    k = min(max(int(q * v.numel()), 1), v.numel())
    return float(v.flatten().float().kthvalue(k).values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", nargs="+", default=["llama2-7b"], choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.8, 0.9, 0.95])
    p.add_argument("--shares", nargs="+", type=float, default=list(BYTE_SHARES))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tag", default=None, help="output name (default: predicted_DEVICE)")
    args = p.parse_args()
    dev, dtype = args.device, getattr(torch, args.dtype)
    tag = args.tag or f"predicted_{dev}"
    torch.manual_seed(0)
    rows = []
    print(
        f"{'width':10s} {'tok':>3s} {'s':>5s} {'rank':>5s} {'dense':>7s} {'exact':>7s} "
        f"{'pred':>7s} {'dejavu':>7s} {'exact x':>7s} {'pred x':>7s} {'bound':>6s} {'/bound':>6s}"
    )
    for width in args.widths:
        d, d_ff = WIDTHS[width]
        w_gate = (torch.randn(d_ff, d) * d**-0.5).to(dev, dtype)
        w_up = (torch.randn(d_ff, d) * d**-0.5).to(dev, dtype)
        w_down_t = (torch.randn(d_ff, d) * d_ff**-0.5).to(dev, dtype)
        for tokens in args.tokens:
            xs = torch.randn(POOL, tokens, d).to(dev, dtype)
            gate = xs @ w_gate.T
            for share in args.shares:
                rank = rank_for(share, d, d_ff)
                a = (torch.randn(rank, d) * d**-0.5).to(dev, dtype)
                b = (torch.randn(d_ff, rank) * rank**-0.5).to(dev, dtype)
                est = (xs @ a.T) @ b.T
                for s in args.sparsity:
                    t, cut = max(_quantile(gate, s), 0.0), _quantile(est, s)
                    fns = _contenders(xs, a, b, cut, w_gate, w_up, w_down_t, t)
                    ms = time_interleaved(fns, dev, args.repeats)
                    predicted_s = float((est <= cut).float().mean())
                    bound = predicted_bound(predicted_s, rank, d, d_ff)
                    row = {
                        "width": width,
                        "d": d,
                        "d_ff": d_ff,
                        "tokens": tokens,
                        "sparsity": s,
                        "true_sparsity": float((gate < t).float().mean()),
                        "predicted_sparsity": predicted_s,
                        "rank": rank,
                        "predictor_share_of_ffn_bytes": share,
                        **{f"{k}_ms": v for k, v in ms.items()},
                        "exact_speedup": ms["dense"] / ms["exact"],
                        "predicted_speedup": ms["dense"] / ms["predicted"],
                        "dejavu_torch_speedup": ms["dense"] / ms["dejavu_torch"],
                        "predicted_bound": bound,
                        "exact_bound": exact_bound(s),
                        "predicted_over_bound": ms["dense"] / ms["predicted"] / bound,
                    }
                    rows.append(row)
                    print(
                        f"{width:10s} {tokens:3d} {s:5.2f} {rank:5d} {ms['dense']:7.2f} "
                        f"{ms['exact']:7.2f} {ms['predicted']:7.2f} {ms['dejavu_torch']:7.2f} "
                        f"{row['exact_speedup']:7.2f} {row['predicted_speedup']:7.2f} "
                        f"{bound:6.2f} {row['predicted_over_bound']:6.2f}",
                        flush=True,
                    )
    result = {
        "machine": machine(),
        "device": dev,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(args.out / f"{tag}.json", result)
    plot(rows, args.out / f"{tag}.png")
    print(f"wrote {args.out / (tag + '.json')}")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["width"], r["tokens"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (width, tokens) in zip(axes[0], keys):
        sel = [r for r in rows if r["width"] == width and r["tokens"] == tokens]
        for rank in sorted({r["rank"] for r in sel}):
            mine = [r for r in sel if r["rank"] == rank]
            xs = [r["sparsity"] for r in mine]
            line = ax.plot(
                xs, [r["predicted_speedup"] for r in mine], marker="o", label=f"r={rank}"
            )
            ax.plot(xs, [r["predicted_bound"] for r in mine], ls="--", color=line[0].get_color())
            ax.plot(
                xs, [r["dejavu_torch_speedup"] for r in mine], ls=":", color=line[0].get_color()
            )
        exact = [r for r in sel if r["rank"] == min(x["rank"] for x in sel)]
        ax.plot(
            [r["sparsity"] for r in exact],
            [r["exact_speedup"] for r in exact],
            "k-s",
            label="exact mode",
        )
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(
            f"{width}, {tokens} token(s): predicted (dashed: bound, dotted: Deja Vu torch)"
        )
        ax.set_xlabel("sparsity (true = predicted)")
        ax.set_ylabel("speedup over dense")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
