"""ProSparse with transformers.Trainer on the embedded default (SmolLM2-135M + Wikipedia sample).

Swaps SiLU for ReLU, trains with the progressive L1 penalty through the Trainer (the penalty
enters through ``compute_loss_func``, lambda and the sparsity of x1 appear in the Trainer's
logs), then measures held-out sparsity and perplexity.

    .venv/bin/python examples/hf_trainer.py --max-steps 20 --out runs/trainer
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments

from prosparse_fx import ActivationRegularizer, ProSparseSchedule, evaluate, relufy_
from prosparse_fx.config import SparsifyConfig
from prosparse_fx.data import load_documents, split_documents, token_windows
from prosparse_fx.models import load_model
from prosparse_fx.training.hf_trainer import ProSparseTrainerPlugin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--out", default="runs/trainer")
    args = p.parse_args()

    model, tok = load_model()
    split = split_documents(load_documents())
    train = token_windows(tok, split.train, 128)
    held_out = token_windows(tok, split.held_out, 128)[:8]
    dataset = [{"input_ids": w, "labels": w.clone()} for w in train]

    sites = relufy_(model, "relu")
    # the main job's default stages, scaled to --max-steps
    schedule = ProSparseSchedule.from_stages(SparsifyConfig().stages).scaled(args.max_steps)
    reg = ActivationRegularizer(model, schedule, sites=sites)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.max_steps,
            per_device_train_batch_size=4,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=dataset,
    )
    ProSparseTrainerPlugin(reg).attach(trainer)
    trainer.train()
    reg.remove()
    result = evaluate(model, held_out, sites=sites)
    print(f"held-out perplexity {result.perplexity:.2f}, sparsity {result.sparsity.sparsity:.4f}")


if __name__ == "__main__":
    main()
