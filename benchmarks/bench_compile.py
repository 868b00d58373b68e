"""Greedy decoding through torch.compile: eager dense, Inductor alone, and the ``prosparse``
backend (sparse-FFN ops), on the main job's model, in one run.

Loads a model folder written by ``prosparse-fx sparsify`` (default ``runs/default``) and decodes
``--new-tokens`` tokens greedily with a static KV cache (fixed shapes: one compile for the
prompt, one for the decoding steps). It checks that each compiled variant's tokens equal eager
ones and reports the largest logit difference on the prompt, then times the decoding of the
three variants interleaved, median of ``--repeats`` runs after warm-up. Prints a table and
writes JSON with the machine.

    python benchmarks/bench_compile.py --model runs/default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_interleaved, write_json  # noqa: E402

import prosparse_fx  # noqa: E402,F401  (registers the backend and hidden_act="fatrelu")
from prosparse_fx import find_ffn_sites, measure_sparsity  # noqa: E402
from prosparse_fx.models import load_model  # noqa: E402

PROMPT = "The history of the city begins in the early Middle Ages, when"


def greedy(forward: Any, model: Any, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, Any]:
    """``n`` greedy tokens after ``ids`` ``[1, T]`` with a static cache; returns the tokens
    ``[1, n]`` and the prompt's logits."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n)
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])
        logits = forward(input_ids=ids, past_key_values=cache, cache_position=pos).logits
        prompt_logits = logits
        out = []
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(n):
            out.append(token)
            if i == n - 1:
                break
            pos = torch.tensor([ids.shape[1] + i])
            logits = forward(input_ids=token, past_key_values=cache, cache_position=pos).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, 1), prompt_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/default"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    ids = tok(args.prompt, return_tensors="pt").input_ids
    variants: dict[str, Any] = {
        "eager": model,
        "inductor": torch.compile(model, backend="inductor"),
        "prosparse": torch.compile(model, backend="prosparse"),
    }
    tokens, logits, compile_s = {}, {}, {}
    for name, fwd in variants.items():
        start = time.perf_counter()
        tokens[name], logits[name] = greedy(fwd, model, ids, args.new_tokens)
        compile_s[name] = time.perf_counter() - start
    # dynamic shapes: prompts of three lengths through one dynamic-shape compile
    calls = []
    import prosparse_fx.backend as backend

    real_compile = backend._compile

    def counting(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real_compile(*a, **kw)

    backend._compile = counting
    dyn = torch.compile(model, backend="prosparse", dynamic=True)
    calls_after_first, dyn_diff = 0, 0.0
    with torch.no_grad():
        for length in (5, 9, 16):
            x = ids[:, :length] if ids.shape[1] >= length else ids.repeat(1, 2)[:, :length]
            ref = model(input_ids=x, use_cache=False).logits
            got = dyn(input_ids=x, use_cache=False).logits
            dyn_diff = max(dyn_diff, float((got - ref).abs().max()))
            calls_after_first = calls_after_first or len(calls)
    backend._compile = real_compile
    dynamic = {
        "lengths": [5, 9, 16],
        "backend_compiles_after_first_length": calls_after_first,
        "backend_compiles_total": len(calls),
        "max_abs_logit_diff": dyn_diff,
    }
    print(f"dynamic shapes: {dynamic}")

    sites = find_ffn_sites(model)
    sparsity = measure_sparsity(model, torch.cat([ids, tokens["eager"]], 1), sites=sites)
    ms = time_interleaved(
        {k: (lambda f=f: greedy(f, model, ids, args.new_tokens)) for k, f in variants.items()},
        "cpu",
        args.repeats,
        warmup=1,
    )
    rows = {
        name: {
            "tokens_per_s": args.new_tokens / (ms[name] / 1e3),
            "speedup_vs_eager": ms["eager"] / ms[name],
            "tokens_equal_eager": bool(torch.equal(tokens[name], tokens["eager"])),
            "max_abs_prompt_logit_diff": float((logits[name] - logits["eager"]).abs().max()),
            "first_run_s": compile_s[name],
        }
        for name in variants
    }
    print(f"{'variant':10s} {'tokens/s':>9s} {'vs eager':>9s} {'same tokens':>12s} "
          f"{'max |dlogit|':>13s} {'first run s':>12s}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:10s} {r['tokens_per_s']:9.2f} {r['speedup_vs_eager']:9.3f} "
              f"{str(r['tokens_equal_eager']):>12s} {r['max_abs_prompt_logit_diff']:13.2e} "
              f"{r['first_run_s']:12.1f}")  # fmt: skip
    write_json(
        args.out / "compile_decode_cpu.json",
        {
            "model": str(args.model),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "sparsity_x1": sparsity.sparsity,
            "variants": rows,
            "dynamic_shapes": dynamic,
            "machine": machine(),
            "text": tok.decode(tokens["eager"][0]),
        },
    )


if __name__ == "__main__":
    main()
