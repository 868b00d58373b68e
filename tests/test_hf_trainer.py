"""ProSparse in transformers.Trainer: the penalty's weight (against a hand-made step, with and
without gradient accumulation), lambda following the schedule, and the logged values."""

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from prosparse_fx import ActivationRegularizer, ProSparseSchedule, relufy_
from prosparse_fx.training.hf_trainer import ProSparseTrainerPlugin
from tests.models import tiny

LAM = 5.0
LR = 0.1


def _data(n: int = 4, length: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (n, length), generator=gen)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _model():
    model = tiny("llama")
    relufy_(model, "relu")
    model.train()
    return model


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        optim="sgd",
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1e9,
        weight_decay=0.0,
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _train(tmp_path, schedule, **kw):
    model = _model()
    reg = ActivationRegularizer(model, schedule)
    trainer = Trainer(model=model, args=_args(tmp_path, **kw), train_dataset=_data())
    ProSparseTrainerPlugin(reg).attach(trainer)
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            if logs and "prosparse/lambda" in logs:
                seen.append(dict(logs))

    trainer.add_callback(Recorder())
    trainer.train()
    reg.remove()
    return model, seen


def _hand_step(lam: float = LAM):
    """One SGD step on the whole batch of 4: LM loss + lam * sum of per-layer mean |x1|."""
    model = _model()
    reg = ActivationRegularizer(model, lam)
    batch = torch.stack([d["input_ids"] for d in _data()])
    loss = model(input_ids=batch, labels=batch).loss + reg.penalty(1)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return model


@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2), (1, 4)])
def test_penalty_weight_matches_a_hand_made_step(tmp_path, batch, accum) -> None:
    model, _ = _train(
        tmp_path,
        LAM,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
    )
    expected = _hand_step()
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert (p - q).abs().max() < 1e-5, name
    without_penalty = dict(_hand_step(0.0).named_parameters())  # the penalty really counted
    w = "model.layers.0.mlp.gate_proj.weight"
    assert (dict(model.named_parameters())[w] - without_penalty[w]).abs().max() > 1e-4


def test_lambda_follows_schedule_and_is_logged(tmp_path) -> None:
    schedule = ProSparseSchedule.from_stages([(0.0, 1), (0.1, 2), (0.4, 4)])
    _, seen = _train(tmp_path, schedule, per_device_train_batch_size=2, max_steps=4)
    assert [entry["prosparse/lambda"] for entry in seen] == [schedule(s) for s in (1, 2, 3, 4)]
    for entry in seen:
        assert entry["prosparse/l1"] > 0
        assert 0.3 < entry["prosparse/sparsity"] < 1.0


def test_attach_refuses_an_existing_loss_function(tmp_path) -> None:
    model = _model()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=1),
        train_dataset=_data(),
        compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
    )
    with pytest.raises(ValueError, match="compute_loss_func"):
        ProSparseTrainerPlugin(ActivationRegularizer(model, 0.1)).attach(trainer)


def test_plugin_must_be_attached_and_eval_loss_is_the_lm_loss(tmp_path) -> None:
    model = _model()
    reg = ActivationRegularizer(model, LAM)
    plugin = ProSparseTrainerPlugin(reg)
    trainer = Trainer(
        model=model, args=_args(tmp_path, max_steps=1), train_dataset=_data(), callbacks=[plugin]
    )
    with pytest.raises(RuntimeError, match="not attached"):
        trainer.train()
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), eval_dataset=_data())
    plugin = ProSparseTrainerPlugin(reg).attach(trainer)
    with pytest.raises(ValueError, match="already attached"):
        plugin.attach(trainer)
    batch = torch.stack([d["input_ids"] for d in _data()])
    model.eval()
    with torch.no_grad():
        expected = float(model(input_ids=batch, labels=batch).loss)
    reg.clear()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_trains_as_without_it(tmp_path) -> None:
    """Trainer(gradient_checkpointing=True) reruns each layer in the backward; the plugin's penalty,
    its logged values and the weights after three steps are those of a run without it."""
    kw = dict(per_device_train_batch_size=2, max_steps=3)
    ref_model, ref_logs = _train(tmp_path / "a", LAM, **kw)
    model, logs = _train(tmp_path / "b", LAM, gradient_checkpointing=True, **kw)
    assert model.model.layers[0].gradient_checkpointing
    assert len(logs) == len(ref_logs) == 3
    for got, ref in zip(logs, ref_logs):
        for key in ("loss", "prosparse/l1", "prosparse/sparsity"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert (p - q).abs().max() < 1e-5, name


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reentrant_gradient_checkpointing_is_refused(tmp_path) -> None:
    model = _model()
    args = _args(
        tmp_path,
        max_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    trainer = Trainer(model=model, args=args, train_dataset=_data())
    with pytest.raises(ValueError, match="use_reentrant"):
        ProSparseTrainerPlugin(ActivationRegularizer(model, LAM)).attach(trainer)


def test_distillation_in_the_trainer_matches_a_hand_made_step(tmp_path) -> None:
    """The plugin's distillation option: one SGD step equals the library loop's loss
    ``(1 - mix) * LM + mix * T^2 KL + lambda * L1``, made by hand; ``prosparse/kl`` is logged."""
    from prosparse_fx.training.distill import Distillation

    mix, temp = 0.4, 2.0
    teacher = tiny("llama")  # the SiLU original of _model()'s ReLU copy
    model = _model()
    reg = ActivationRegularizer(model, LAM)
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, per_device_train_batch_size=4, max_steps=1),
        train_dataset=_data(),
    )
    distillation = Distillation(teacher, mix=mix, temperature=temp)
    ProSparseTrainerPlugin(reg, distillation=distillation).attach(trainer)
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **k):
            if logs and "prosparse/kl" in logs:
                seen.append(dict(logs))

    trainer.add_callback(Recorder())
    trainer.train()
    reg.remove()

    hand = _model()
    hand_reg = ActivationRegularizer(hand, LAM)
    batch = torch.stack([d["input_ids"] for d in _data()])
    out = hand(input_ids=batch, labels=batch)
    kl = distillation.kl(out.logits, batch)
    loss = (1 - mix) * out.loss + mix * kl + hand_reg.penalty(1)
    loss.backward()
    with torch.no_grad():
        for p in hand.parameters():
            p -= LR * p.grad
    for (name, p), q in zip(model.named_parameters(), hand.parameters()):
        assert (p - q).abs().max() < 1e-5, name
    assert seen and seen[0]["prosparse/kl"] == pytest.approx(float(kl), rel=1e-4)
    assert float(kl) > 0  # the ReLU student differs from its SiLU teacher
