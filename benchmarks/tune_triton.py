"""Sweep the Triton sparse-FFN designs and launch parameters on a CUDA GPU (bf16, LLaMA-2-7B
widths, one and 16 tokens, 0% and 90% sparsity), timing CUDA-graph replays; prints every
configuration, writes JSON whose "best" is a complete ``triton_ffn.TUNING`` table (apply it
with ``bench_ffn.py --tuning``, or copy it into ``prosparse_fx.kernels.triton_ffn.TUNING``).

The measured default comes first, then "compact" coordinate by coordinate (the up kernel's tiles
first, then the down kernel's), since its full grid would not fit a lent GPU's time, then a small
"blocks" grid around its earlier best. The JSON is rewritten after every configuration, so a
sweep cut short by a timeout still leaves the best table so far.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ffn import graphed, make_case  # noqa: E402
from common import machine, time_interleaved, write_json  # noqa: E402

from prosparse_fx.kernels import gated_ffn_reference, sparse_gated_ffn, triton_ffn  # noqa: E402

BLOCKS_GRID = [
    {"block_n": n, "block_k": k, "block_d": dd, "num_warps": 4}
    for n, k, dd in itertools.product((32, 64, 128), (256, 512), (256,))
]
COMPACT_UP = [
    {"up_rows": r, "up_block_k": k, "up_split_k": s}
    for r, k, s in itertools.product((8, 16, 32), (256, 512), (2, 4, 8))
]
COMPACT_DOWN = [
    {"down_rows": r, "down_block_d": dd, "num_warps": w}
    for r, dd, w in itertools.product((16, 32, 64), (128, 256, 512), (4, 8))
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    d, d_ff = 4096, 11008
    cases = [(tok, s) for tok in (1, 16) for s in (0.0, 0.9)]
    built = {c: make_case(d, d_ff, c[0], c[1], "shared", torch.bfloat16, "cuda", 1) for c in cases}
    results: list[dict] = []
    dense = time_interleaved(
        {
            f"{tok}x{s}": graphed(gated_ffn_reference, x, w, t)
            for (tok, s), (x, w, t, _) in built.items()
        },
        "cuda",
        args.repeats,
    )
    print("dense (cuBLAS)", {k: round(v * 1e3, 1) for k, v in dense.items()}, "us", flush=True)

    def measure(table: dict) -> float | None:
        """Sum of the four cases' times (ms) with ``table`` applied, or None if it fails."""
        triton_ffn.apply_tuning(table)  # a full table: checked, then it replaces every entry
        try:
            fns = {
                f"{tok}x{s}": graphed(sparse_gated_ffn, x, w, t)
                for (tok, s), (x, w, t, _) in built.items()
            }
            ms = time_interleaved(fns, "cuda", args.repeats)
        except Exception as exc:  # a config that does not compile or fit
            print(table["design"], table[table["design"]], "failed:", type(exc).__name__)
            return None
        design = table["design"]
        results.append({"design": design, "config": table[design], "ms": ms})
        print(
            design, table[design], {k: round(v * 1e3, 1) for k, v in ms.items()}, "us", flush=True
        )
        return sum(ms.values())

    start = copy.deepcopy(triton_ffn.TUNING)
    best: tuple[float, dict] | None = None

    def save() -> dict:
        """Write the best table so far (a sweep cut short by a timeout still leaves one)."""
        chosen = best[1] if best else start
        write_json(
            args.out / "tune_triton.json",
            {"machine": machine(), "best": chosen, "dense_ms": dense, "results": results},
        )
        return chosen

    def consider(table: dict) -> float | None:
        nonlocal best
        score = measure(table)
        if score is not None and (best is None or score < best[0]):
            best = (score, copy.deepcopy(table))
        save()
        return score

    # the measured default first, then the compact design, then the rest of the blocks grid
    consider({**start, "design": "blocks"})
    compact = dict(start["compact"])
    for grid in (COMPACT_UP, COMPACT_DOWN):
        scored = []
        for change in grid:
            table = {**start, "design": "compact", "compact": {**compact, **change}}
            score = consider(table)
            if score is not None:
                scored.append((score, change))
        if scored:
            compact.update(min(scored, key=lambda sc: sc[0])[1])
    for cfg in BLOCKS_GRID:
        if cfg != start["blocks"]:
            consider({**start, "design": "blocks", "blocks": cfg})
    chosen = save()
    triton_ffn.apply_tuning(chosen)
    print("best", chosen["design"], chosen[chosen["design"]], flush=True)


if __name__ == "__main__":
    main()
