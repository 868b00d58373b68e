"""ONNX Runtime: the sparse export vs the dense export, FFN alone and whole-model decoding.

ffn: one gated FFN (gate/up/down + ReLU) exported dense and sparse (``export_onnx`` with
``example_inputs``), at LLaMA-2-7B widths by default; the gate weights are built so that the
input vector sets the activation sparsity exactly (``--sparsity``; with several tokens each
token draws its own active set), and the measured sparsity is reported. Sessions of the default
crossover ("ours") and of an always-sparse export (crossover 1) are timed, interleaved with the
dense one, median of ``--repeats`` runs after warm-up, over two weight copies (more than the
CPU's caches). Columns: dense ms, ours ms, speedup, the one-token bound 3 / (1 + 2(1 - s)),
always-sparse speedup.

decode: the main job's model (``--model runs/default``) exported dense and sparse with its KV
cache; logits against torch (prompt and every cached step), 32 greedy tokens against torch, and
greedy tokens/s of both exports, interleaved, median of ``--repeats``.

Prints tables, writes JSON and a plot, records the machine.

    python benchmarks/bench_onnx.py ffn
    python benchmarks/bench_onnx.py decode --model runs/default
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ffn import exact_bound  # noqa: E402
from common import machine, time_interleaved, write_json  # noqa: E402

import prosparse_fx  # noqa: E402,F401  (registers hidden_act="fatrelu")
from prosparse_fx.onnx import DEFAULT_CROSSOVER, OnnxCausalLM, export_onnx  # noqa: E402
from prosparse_fx.onnx.runner import session_options  # noqa: E402

WIDTHS = {"llama2-7b": (4096, 11008), "smollm2": (576, 1536)}
RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the city begins in the early Middle Ages, when"


class GatedFFN(nn.Module):
    """LLaMA's MLP with ReLU. Gate columns 0..15 hold 16 independent rank vectors in (0, 1),
    column 16 is -1, the rest small noise: token i with x = e_i + s * e_16 keeps the neurons
    whose rank exceeds s, so its sparsity is s (each token its own random active set)."""

    def __init__(self, d: int, d_ff: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)
        self.act_fn = nn.ReLU()
        with torch.no_grad():
            w = torch.randn(d_ff, d, generator=g) * 1e-3
            for i in range(16):
                w[:, i] = (torch.randperm(d_ff, generator=g) + 0.5) / d_ff
            w[:, 16] = -1.0
            self.gate_proj.weight.copy_(w)
            self.up_proj.weight.normal_(0, d**-0.5, generator=g)
            self.down_proj.weight.normal_(0, d_ff**-0.5, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def ffn_input(d: int, tokens: int, sparsity: float, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, d, generator=g) * 1e-4
    for i in range(tokens):
        x[0, i, :17] = 0.0
        x[0, i, i % 16] = 1.0
        x[0, i, 16] = sparsity
    return x.numpy()


class Rotating:
    """Run one session per call, cycling over weight copies (so the weights are not cached)."""

    def __init__(self, sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray]) -> None:
        self.sessions, self.feeds, self.turn = sessions, feeds, 0

    def __call__(self) -> None:
        self.sessions[self.turn % len(self.sessions)].run(None, self.feeds)
        self.turn += 1


def session(path: Path, threads: int | None) -> ort.InferenceSession:
    # each session has its own thread pool whose idle threads spin after a run; with several
    # sessions timed in turn on 2 cores, that spinning steals the next session's CPU
    options = session_options(threads, spinning=False)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench_ffn(args: argparse.Namespace) -> None:
    rows = []
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")  # GBs of weights: removed at exit
    work = Path(tmp.name)
    for width in args.widths:
        d, d_ff = WIDTHS[width]
        sessions: dict[str, list[ort.InferenceSession]] = {"dense": [], "ours": [], "sparse": []}
        for copy in range(args.copies):
            module = GatedFFN(d, d_ff, seed=copy).eval()
            example = (torch.from_numpy(ffn_input(d, 2, 0.5)),)
            shapes = ({1: torch.export.Dim("tokens")},)
            variants = {
                "dense": (False, 0.0),
                "ours": (True, args.crossover),
                "sparse": (True, 1.0),
            }
            for name, (sparse, crossover) in variants.items():
                path = work / f"{width}-{name}-{copy}.onnx"
                export_onnx(
                    module, path, example_inputs=example, dynamic_shapes=shapes, sparse=sparse,
                    crossover=crossover,
                )  # fmt: skip
                sessions[name].append(session(path, args.threads))
            del module
        for tokens in args.tokens:
            for s in args.sparsity:
                x = ffn_input(d, tokens, s)
                with torch.no_grad():
                    module = GatedFFN(d, d_ff, seed=0)
                    gate = torch.from_numpy(x) @ module.gate_proj.weight.T
                    measured = float((gate <= 0).float().mean())
                    reference = module(torch.from_numpy(x)).numpy()
                outs = {k: v[0].run(None, {"input_0": x})[0] for k, v in sessions.items()}
                err = max(float(np.abs(o - reference).max()) for o in outs.values())
                ms = time_interleaved(
                    {k: Rotating(v, {"input_0": x}) for k, v in sessions.items()},
                    "cpu", args.repeats, warmup=4,
                )  # fmt: skip
                row = {
                    "width": width,
                    "d": d,
                    "d_ff": d_ff,
                    "tokens": tokens,
                    "sparsity": s,
                    "measured_sparsity": measured,
                    "dense_ms": ms["dense"],
                    "ours_ms": ms["ours"],
                    "speedup": ms["dense"] / ms["ours"],
                    "bound_1_token": exact_bound(s),
                    "always_sparse_speedup": ms["dense"] / ms["sparse"],
                    "max_abs_err_vs_torch": err,
                }
                rows.append(row)
                print(
                    f"{width:10s} tok {tokens:2d} s {s:4.2f} (meas {measured:.3f})  dense "
                    f"{row['dense_ms']:8.3f} ms  ours {row['ours_ms']:8.3f} ms  "
                    f"x{row['speedup']:.2f} (bound {row['bound_1_token']:.2f}, always-sparse "
                    f"x{row['always_sparse_speedup']:.2f})  err {err:.1e}",
                    flush=True,
                )
    result = {
        "crossover": args.crossover,
        "repeats": args.repeats,
        "weight_copies": args.copies,
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "machine": machine(),
        "rows": rows,
    }
    write_json(args.out / "onnx_ffn_cpu.json", result)
    plot(rows, args.out / "onnx_ffn_cpu.png")
    tmp.cleanup()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False)
    for ax, width in zip(axes[0], widths):
        for tokens in sorted({r["tokens"] for r in rows}):
            sel = [r for r in rows if r["width"] == width and r["tokens"] == tokens]
            ax.plot([r["sparsity"] for r in sel], [r["speedup"] for r in sel], "o-",
                    label=f"{tokens} token(s)")  # fmt: skip
        xs = sorted({r["sparsity"] for r in rows})
        ax.plot(xs, [exact_bound(s) for s in xs], "k--", lw=0.8, label="bound, 1 token")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=f"ONNX Runtime, {width}", xlabel="activation sparsity",
               ylabel="speedup over dense export")  # fmt: skip
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def bench_decode(args: argparse.Namespace) -> None:
    from prosparse_fx import measure_sparsity
    from prosparse_fx.models import load_model

    model, tok = load_model(args.model)
    model.eval()
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
    work = Path(tmp.name)
    paths = {
        "dense": export_onnx(model, work / "dense.onnx", sparse=False),
        "sparse": export_onnx(model, work / "sparse.onnx", crossover=args.crossover),
    }
    lms = {k: OnnxCausalLM(p, threads=args.threads, spinning=False) for k, p in paths.items()}
    ids = tok(args.prompt, return_tensors="np").input_ids
    n = ids.shape[1]
    with torch.no_grad():
        expected = model.generate(
            torch.from_numpy(ids), max_new_tokens=args.new_tokens, do_sample=False,
            min_new_tokens=args.new_tokens,
        ).numpy()  # fmt: skip
        full = model(input_ids=torch.from_numpy(expected)).logits.numpy()
    result: dict = {"model": str(args.model), "new_tokens": args.new_tokens, "prompt": args.prompt}
    for name, lm in lms.items():
        out = lm.generate(ids, args.new_tokens)
        logits, past = lm.forward(expected[:, :n], np.ones((1, n), np.int64))
        prompt_diff = float(np.abs(logits - full[:, :n]).max())
        step_diff = 0.0
        for i in range(n, expected.shape[1] - 1):
            mask = np.ones((1, i + 1), np.int64)
            logits, past = lm.forward(expected[:, i : i + 1], mask, past=past)
            step_diff = max(step_diff, float(np.abs(logits[:, 0] - full[:, i]).max()))
        result[name] = {
            "tokens_equal_torch": bool(np.array_equal(out, expected)),
            "prompt_max_abs_logit_diff": prompt_diff,
            "cached_steps_max_abs_logit_diff": step_diff,
        }
    ms = time_interleaved(
        {k: (lambda lm=lm: lm.generate(ids, args.new_tokens)) for k, lm in lms.items()},
        "cpu", args.repeats, warmup=1,
    )  # fmt: skip
    for name in lms:
        result[name]["tokens_per_s"] = args.new_tokens / (ms[name] / 1e3)
    result["speedup"] = ms["dense"] / ms["sparse"]
    result["sparsity_x1"] = measure_sparsity(model, torch.from_numpy(expected)).sparsity
    result["onnxruntime"] = ort.__version__
    result["machine"] = machine()
    for name in lms:
        print(name, result[name])
    print(f"speedup {result['speedup']:.3f}, sparsity of x1 {result['sparsity_x1']:.4f}")
    write_json(args.out / "onnx_decode_cpu.json", result)
    tmp.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    f = sub.add_parser("ffn", help="the gated FFN alone")
    f.add_argument("--widths", nargs="+", default=["llama2-7b"], choices=list(WIDTHS))
    f.add_argument("--tokens", nargs="+", type=int, default=[1, 4])
    f.add_argument("--sparsity", nargs="+", type=float,
                   default=[0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])  # fmt: skip
    f.add_argument("--repeats", type=int, default=40)
    f.add_argument("--copies", type=int, default=2, help="weight copies to rotate over")
    dec = sub.add_parser("decode", help="greedy decoding of the main job's model")
    dec.add_argument("--model", type=Path, default=Path("runs/default"))
    dec.add_argument("--prompt", default=PROMPT)
    dec.add_argument("--new-tokens", type=int, default=32)
    dec.add_argument("--repeats", type=int, default=5)
    for sp in (f, dec):
        sp.add_argument("--crossover", type=float, default=DEFAULT_CROSSOVER)
        sp.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
        sp.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    bench_ffn(args) if args.what == "ffn" else bench_decode(args)


if __name__ == "__main__":
    main()
