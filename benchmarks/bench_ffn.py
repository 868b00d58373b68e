"""Sparse gated FFN vs dense, one FFN at LLaMA-2-7B, LLaMA-2-13B and SmolLM2 widths.

For each width, token count (1, 4, 16), sparsity (0..99%) and active-set mode (shared by all
tokens, or drawn independently per token) it times the dense reference (three matmuls, torch)
and ``torch.ops.prosparse.sparse_gated_ffn`` interleaved in one run, median of ``--repeats``
runs after warm-up, weights rotated over copies bigger than the caches. Prints a table, writes
JSON and a plot (speedup vs sparsity), and records the machine.

    python benchmarks/bench_ffn.py --device cpu            # fp32
    python benchmarks/bench_ffn.py --device cuda           # bf16, Triton kernels
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_interleaved, write_json  # noqa: E402

from prosparse_fx.kernels import gated_ffn_reference, sparse_gated_ffn, triton_ffn  # noqa: E402

WIDTHS = {"llama2-7b": (4096, 11008), "llama2-13b": (5120, 13824), "smollm2": (576, 1536)}
CACHE_BYTES = 256 * 2**20  # rotate weight copies until they exceed this


def exact_bound(s: float) -> float:
    """One token, gate dense: dense reads 3 matrices, sparse 1 + 2(1 - s)."""
    return 3.0 / (1.0 + 2.0 * (1.0 - s))


_BASE: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}


def _base_weights(d, d_ff, dtype, device, copies):
    """Random weights per width, made once on the device (copies for rotation)."""
    key = (d, d_ff, dtype, device, copies)
    if key not in _BASE:
        _BASE.clear()
        g = torch.Generator(device=device).manual_seed(0)
        _BASE[key] = [
            (
                torch.randn(d_ff, d, generator=g, device=device) * d**-0.5,
                torch.randn(d_ff, d, generator=g, device=device).to(dtype) * d**-0.5,
                torch.randn(d_ff, d, generator=g, device=device).to(dtype) * d_ff**-0.5,
            )
            for _ in range(copies)
        ]
    return _BASE[key]


def make_case(d, d_ff, tokens, sparsity, mode, dtype, device, copies, seed=0):
    """Inputs, rotating weight copies and threshold with the requested activation sparsity.

    shared: x > 0 and the gate rows of inactive neurons negative, so all tokens share one active
    set (t = 0); independent: random gate values and t at their ``sparsity`` quantile, so each
    token draws its own active set.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    weights = []
    for w_gate, w_up, w_down_t in _base_weights(d, d_ff, dtype, device, copies):
        if mode == "shared":
            n_active = round((1 - sparsity) * d_ff)
            active = torch.randperm(d_ff, generator=g, device=device)[:n_active]
            sign = -torch.ones(d_ff, 1, device=device)
            sign[active] = 1.0
            w_gate = w_gate.abs() * sign
        weights.append((w_gate.to(dtype), w_up, w_down_t))
    if mode == "shared":
        x = (torch.rand(tokens, d, generator=g, device=device) + 0.01).to(dtype)
        threshold = 0.0
    else:
        x = torch.randn(tokens, d, generator=g, device=device).to(dtype)
        gate = (x.float() @ weights[0][0].float().T).flatten()
        k = min(max(int(sparsity * gate.numel()), 1), gate.numel())
        threshold = max(float(gate.kthvalue(k).values), 0.0) if sparsity > 0 else 0.0
    gate = x.float() @ weights[0][0].float().T
    inactive = gate < threshold if threshold > 0 else gate <= 0
    return x, weights, threshold, float(inactive.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--sparsity", nargs="+", type=float, default=[0, 0.5, 0.8, 0.9, 0.95, 0.99])
    p.add_argument("--modes", nargs="+", default=["shared", "independent"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default=None, help="file name stem (default: ffn_<device>)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="CUDA only: time CUDA-graph replays (no Python or launch overhead), as decoders run",
    )
    p.add_argument("--tuning", type=Path, default=None, help="tune_triton.py JSON to apply")
    p.add_argument(
        "--design", default=None, choices=triton_ffn.DESIGNS, help="CUDA only: Triton design"
    )
    args = p.parse_args()
    if (args.tuning is not None or args.design is not None) and not args.device.startswith("cuda"):
        sys.exit("--tuning and --design choose Triton launches: use them with --device cuda")
    if args.tuning is not None:
        try:
            best = json.loads(args.tuning.read_text())["best"]
            triton_ffn.apply_tuning(best)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.exit(
                f"cannot apply the tuning file {args.tuning}: {type(exc).__name__}: {exc}; "
                "give the JSON that benchmarks/tune_triton.py writes"
            )
    if args.design is not None:
        triton_ffn.apply_tuning({"design": args.design})
    if args.tuning is not None or args.design is not None:
        print("tuning:", triton_ffn.TUNING)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    rows = []
    header = (
        f"{'width':11s} {'tok':>3s} {'mode':11s} {'sparsity':>8s} {'dense ms':>9s} "
        f"{'ours ms':>8s} {'speedup':>7s} {'bound':>6s} {'/bound':>6s}"
    )
    print(header)
    for width in args.widths:
        d, d_ff = WIDTHS[width]
        per_copy = 3 * d * d_ff * torch.finfo(dtype).bits // 8
        copies = max(1, -(-CACHE_BYTES // per_copy))
        for tokens in args.tokens:
            for mode in args.modes:
                if tokens == 1 and mode == "independent" and "shared" in args.modes:
                    pass  # one token: both modes are one active set, still measured
                for s in args.sparsity:
                    x, weights, t, measured = make_case(
                        d, d_ff, tokens, s, mode, dtype, args.device, copies
                    )
                    fns = {
                        "dense": rotating(gated_ffn_reference, x, weights, t),
                        "ours": rotating(sparse_gated_ffn, x, weights, t),
                    }
                    if args.cuda_graph:
                        fns = {
                            "dense": graphed(gated_ffn_reference, x, weights, t),
                            "ours": graphed(sparse_gated_ffn, x, weights, t),
                        }
                    ms = time_interleaved(fns, args.device, args.repeats)
                    if args.cuda_graph:
                        ms = {k: v / copies for k, v in ms.items()}
                    bound = exact_bound(measured)
                    row = {
                        "width": width,
                        "d": d,
                        "d_ff": d_ff,
                        "tokens": tokens,
                        "mode": mode,
                        "target_sparsity": s,
                        "sparsity": measured,
                        "dense_ms": ms["dense"],
                        "ours_ms": ms["ours"],
                        "speedup": ms["dense"] / ms["ours"],
                        "bound_1tok": bound,
                        "ours_over_bound": ms["dense"] / ms["ours"] / bound,
                    }
                    rows.append(row)
                    print(
                        f"{width:11s} {tokens:3d} {mode:11s} {measured:8.3f} "
                        f"{ms['dense']:9.3f} {ms['ours']:8.3f} {row['speedup']:7.2f} "
                        f"{bound:6.2f} {row['ours_over_bound']:6.2f}",
                        flush=True,
                    )
    tag = args.tag or f"ffn_{args.device.split(':')[0]}" + ("_graph" if args.cuda_graph else "")
    result = {
        "machine": machine(),
        "dtype": str(dtype),
        "repeats": args.repeats,
        "cuda_graph": args.cuda_graph,
        "triton_tuning": triton_ffn.TUNING if args.device.startswith("cuda") else None,
        "rows": rows,
    }
    write_json(args.out / f"{tag}.json", result)
    plot(rows, args.out / f"{tag}.png", f"sparse gated FFN vs dense ({args.device}, {dtype})")
    print(f"wrote {args.out / (tag + '.json')}")


def rotating(fn, x, weights, t):
    """A call of ``fn`` on the next weight copy each time (so weights come from memory)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(weights)
        return fn(x, *weights[state["i"]], t)

    return call


def graphed(fn, x, weights, t):
    """A CUDA graph that runs ``fn`` once per weight copy; returns its replay."""
    for w in weights:  # warm up (Triton compiles, allocator settles) outside the capture
        fn(x, *w, t)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(x, *w, t)
    return graph.replay


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False)
    for ax, width in zip(axes[0], widths):
        for tokens, mode in sorted({(r["tokens"], r["mode"]) for r in rows}):
            sel = [
                r
                for r in rows
                if r["width"] == width and r["tokens"] == tokens and r["mode"] == mode
            ]
            ax.plot(
                [r["sparsity"] for r in sel],
                [r["speedup"] for r in sel],
                marker="o",
                ms=3,
                label=f"{tokens} tok, {mode}",
            )
        xs = [i / 100 for i in range(0, 100)]
        ax.plot(xs, [exact_bound(s) for s in xs], "k--", lw=0.8, label="bound, 1 token")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(width)
        ax.set_xlabel("activation sparsity")
        ax.set_ylabel("speedup over dense")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
