"""Greedy decoding, dense vs sparse-FFN rewritten (``sparsify_ffn_``), on the main job's model.

Loads a model folder written by ``prosparse-fx sparsify`` (default ``runs/default``), checks
that the rewritten model's greedy tokens equal the dense model's and how far its logits are (at
every decoding step, and over the whole text in one forward with the sparse path forced),
then times greedy decoding of ``--new-tokens`` tokens for both, interleaved, median of
``--repeats`` runs after one warm-up. Reports tokens/s, the speedup, the activation sparsity of
x1 measured on the prompt and generated text, and the machine; writes JSON.

    python benchmarks/bench_decode.py --model runs/default
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
from prosparse_fx import find_ffn_sites, measure_sparsity  # noqa: E402
from prosparse_fx.kernels import set_cpu_crossover  # noqa: E402
from prosparse_fx.models import load_model  # noqa: E402
from prosparse_fx.sparse_modules import sparsify_ffn_  # noqa: E402

PROMPT = "The history of the city begins in the early Middle Ages, when"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("runs/default"))
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    dense, tok = load_model(args.model)
    dense.to(args.device).eval()
    sparse = copy.deepcopy(dense)
    sites = find_ffn_sites(dense)
    sparsify_ffn_(sparse, sites=sites)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(args.device)

    def generate(model, **kw):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                  min_new_tokens=args.new_tokens, **kw)  # fmt: skip

    # the logits of every decoding step (the prompt, then one token at a time with the cache)
    steps = {"return_dict_in_generate": True, "output_logits": True}
    run_dense, run_sparse = generate(dense, **steps), generate(sparse, **steps)
    out_dense, out_sparse = run_dense.sequences, run_sparse.sequences
    diff = max((a - b).abs().max() for a, b in zip(run_dense.logits, run_sparse.logits))
    # the whole text in one forward, with the sparse path forced even where its 77 tokens' union
    # of active neurons would send it dense
    set_cpu_crossover(1.0)
    try:
        with torch.no_grad():
            full = dense(input_ids=out_dense).logits - sparse(input_ids=out_dense).logits
    finally:
        set_cpu_crossover(None)
    sparsity = measure_sparsity(dense, out_dense.cpu(), sites=sites)
    ms = time_interleaved(
        {"dense": lambda: generate(dense), "sparse": lambda: generate(sparse)},
        args.device, args.repeats, warmup=1,
    )  # fmt: skip
    result = {
        "model": str(args.model),
        "new_tokens": args.new_tokens,
        "tokens_equal": bool(torch.equal(out_dense, out_sparse)),
        "max_abs_logit_diff": float(diff),
        "max_abs_logit_diff_one_forward": float(full.abs().max()),
        "sparsity_x1": sparsity.sparsity,
        "dense_tokens_per_s": args.new_tokens / (ms["dense"] / 1e3),
        "sparse_tokens_per_s": args.new_tokens / (ms["sparse"] / 1e3),
        "speedup": ms["dense"] / ms["sparse"],
        "machine": machine(),
        "text": tok.decode(out_dense[0][ids.shape[1] :]),
    }
    for key in ("tokens_equal", "max_abs_logit_diff", "max_abs_logit_diff_one_forward",
                "sparsity_x1", "dense_tokens_per_s",
                "sparse_tokens_per_s", "speedup"):  # fmt: skip
        print(f"{key:22s} {result[key]}")
    write_json(args.out / f"decode_{args.device}.json", result)


if __name__ == "__main__":
    main()
