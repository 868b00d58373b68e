"""Sweep the Triton sparse-FFN launch parameters on a CUDA GPU (bf16, LLaMA-2-7B widths, one
and 16 tokens, 0% and 90% sparsity), timing CUDA-graph replays; prints the best per kernel and
writes JSON. Copy the winners into ``prosparse_fx.kernels.triton_ffn.TUNING``."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ffn import graphed, make_case  # noqa: E402
from common import machine, time_interleaved, write_json  # noqa: E402

from prosparse_fx.kernels import sparse_gated_ffn, triton_ffn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    d, d_ff = 4096, 11008
    cases = [(tok, s) for tok in (1, 16) for s in (0.0, 0.9)]
    built = {c: make_case(d, d_ff, c[0], c[1], "shared", torch.bfloat16, "cuda", 1) for c in cases}
    gated_grid = [
        {"block_n": n, "block_k": k, "block_d": dd, "num_warps": w}
        for n, k, dd, w in itertools.product((32, 64, 128), (256, 512), (128, 256), (4, 8))
    ]
    default = {k: dict(v) for k, v in triton_ffn.TUNING.items()}
    results = []
    for kernel, grid in (("gated", gated_grid),):
        best = None
        for cfg in grid:
            triton_ffn.TUNING[kernel] = cfg
            try:
                fns = {
                    f"{tok}x{s}": graphed(sparse_gated_ffn, x, w, t)
                    for (tok, s), (x, w, t, _) in built.items()
                }
                ms = time_interleaved(fns, "cuda", args.repeats)
            except Exception as exc:  # a config that does not compile or fit
                print(kernel, cfg, "failed:", type(exc).__name__)
                continue
            score = sum(ms.values())
            results.append({"kernel": kernel, "config": cfg, "ms": ms, "score": score})
            print(kernel, cfg, {k: round(v * 1e3, 1) for k, v in ms.items()}, "us", flush=True)
            if best is None or score < best[0]:
                best = (score, cfg)
        triton_ffn.TUNING[kernel] = best[1] if best else default[kernel]
        print("best", kernel, triton_ffn.TUNING[kernel], flush=True)
    write_json(
        args.out / "tune_triton.json",
        {"machine": machine(), "best": triton_ffn.TUNING, "results": results},
    )


if __name__ == "__main__":
    main()
