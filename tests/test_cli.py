"""The command line: the main job on a tiny model, and bad input exiting with code 2."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM
from typer.testing import CliRunner

from prosparse_fx.cli import app

runner = CliRunner()
FAST = {
    "eval_windows": 2,
    "calib_windows": 2,
    "sweep_thresholds": [0.0, 0.1],
    "seq_len": 32,
    "batch_size": 2,
}


def _config(tmp_path, **extra):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST, **extra}))
    return path


def test_sparsify_writes_model_report_and_plots(tmp_path, tiny_model_dir, text_file) -> None:
    out = tmp_path / "out"
    args = [
        "sparsify",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--config",
        str(_config(tmp_path)),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in (
        "sparsity",
        "perplexity",
        "baseline_perplexity",
        "per_layer_sparsity",
        "stage_ends",
        "schedule",
        "threshold_sweep",
        "relu_no_training",
        "history",
    ):
        assert key in report
    assert report["status"] == "done"
    assert len(report["per_layer_sparsity"]) == 2 and 0 <= report["sparsity"] <= 1
    assert [s["step"] for s in report["stage_ends"]] == [1, 2, 3, 4]  # every stage ran
    assert len(report["history"]) == 4
    assert (out / "training.png").stat().st_size > 0
    assert (out / "per_layer_sparsity.png").stat().st_size > 0
    assert not (out / "checkpoint").exists()
    # the written model reloads with plain transformers and measures the reported sparsity
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_act == "fatrelu"
    measured = runner.invoke(
        app,
        [
            "measure",
            str(out),
            "--data",
            str(text_file),
            "--json",
            "--windows",
            "2",
            "--seq-len",
            "32",
        ],
    )
    assert measured.exit_code == 0, measured.output
    assert 0 <= json.loads(measured.stdout)["sparsity"] <= 1
    # --held-out: the run's own held-out windows, so the report's numbers are reproduced
    same = ["--seq-len", str(FAST["seq_len"]), "--windows", str(FAST["eval_windows"])]
    measured = runner.invoke(
        app, ["measure", str(out), "--data", str(text_file), "--held-out", "--json", *same]
    )
    assert measured.exit_code == 0, measured.output
    again = json.loads(measured.stdout)
    assert again["text"] == "held-out split (seed 0)"
    assert again["perplexity"] == pytest.approx(report["perplexity"], rel=1e-4)
    assert again["sparsity"] == pytest.approx(report["sparsity"], abs=1e-6)
    # inputs untouched and a second run into the same folder refused
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output
    assert json.loads((out / "report.json").read_text()) == report


def test_bad_inputs_exit_2_before_work(tmp_path, tiny_model_dir, text_file) -> None:
    cases = [
        (["--model", str(tmp_path / "nope")], "does not exist"),
        (["--data", str(tmp_path / "nope.txt"), "--model", str(tiny_model_dir)], "does not exist"),
        (["--model", str(text_file)], "neither a model folder nor a .gguf"),
        (
            ["--model", str(tiny_model_dir), "--data", str(text_file), "--max-steps", "2"],
            "4 stages need >= 4 steps",
        ),
        (["--model", str(tiny_model_dir), "--preset", "huge"], "unknown preset"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["sparsify", "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, result.output


def test_short_data_and_bad_config(tmp_path, tiny_model_dir) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a\n\nb\n\nc d e")
    result = runner.invoke(
        app,
        [
            "sparsify",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(short),
            "--out",
            str(tmp_path / "o1"),
        ],
    )
    assert (
        result.exit_code == 2
        and "fewer than one batch" in result.output
        or ("shorter than one window" in result.output)
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"stages": [[0, 10]], "learning_rate": 1}')
    result = runner.invoke(
        app,
        [
            "sparsify",
            "--model",
            str(tiny_model_dir),
            "--config",
            str(bad),
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert result.exit_code == 2 and "unknown config field(s) ['learning_rate']" in result.output


def test_model_without_ffn_exits_2(tmp_path, smollm2, text_file) -> None:
    _, tok = smollm2
    folder = tmp_path / "mamba"
    MambaForCausalLM(
        MambaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, state_size=4)
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    result = runner.invoke(
        app,
        [
            "sparsify",
            "--model",
            str(folder),
            "--data",
            str(text_file),
            "--out",
            str(tmp_path / "o"),
            "--config",
            str(_config(tmp_path)),
        ],
    )
    assert result.exit_code == 2 and "no FFN found" in result.output, result.output


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, tiny_model_dir, text_file) -> None:
    out = tmp_path / "out"
    # lambda * L1 overflows float32 at step 3; the stage end at step 2 is checkpointed (a
    # stage end at least checkpoint_every // 4 steps after the last checkpoint)
    config = _config(tmp_path, stages=[[0.0, 2], [1e300, 3]], checkpoint_every=4)
    result = runner.invoke(
        app,
        [
            "sparsify",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(text_file),
            "--out",
            str(out),
            "--config",
            str(config),
        ],
    )
    assert result.exit_code == 1
    assert "loss became inf at step 3" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "diverged" and len(report["history"]) == 2
    kept = report["last_good_checkpoint"]
    assert kept in result.output and "lower lr" in result.output
    ckpt = AutoModelForCausalLM.from_pretrained(kept)
    assert all(torch.isfinite(p).all() for p in ckpt.parameters())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"max_steps": 0}, "max_steps must be a whole number >= 1"),
        ({"sweep_thresholds": [-1]}, "sweep_thresholds must be a list of numbers >= 0"),
        ({"norm": "bogus"}, "norm must be one of"),
        ([1, 2], "must be a table of SparsifyConfig fields"),
        ({"threshold": "high"}, "threshold must be a finite number"),
        ({"batch_size": 2.5}, "batch_size must be a whole number"),
        ({"seed": "x"}, "seed must be a whole number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"precision": "fp8"}, "precision must be 'auto', 'bf16' or 'fp32'"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a whole number >= 1"),
    ],
)
def test_bad_config_values_exit_2_and_create_nothing(tmp_path, config, message) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "never"
    result = runner.invoke(app, ["sparsify", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_bad_device_exits_2(tmp_path) -> None:
    result = runner.invoke(app, ["sparsify", "--device", "nonsense", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown device" in result.output


def _run_args(model, data, config, out):
    return ["sparsify", "--model", str(model), "--data", str(data), "--config", str(config)] + (
        ["--out", str(out)] if out else []
    )


def _assert_resume_matches(whole, part, resumed_at: int, steps: int) -> None:
    """Resume the interrupted run in ``part``; its loss curve, L1, lambda, stage-end
    perplexities and final sparsity equal the uninterrupted run's in ``whole``."""
    from prosparse_fx.run_folder import RunFolder
    from prosparse_fx.training.checkpoint import load_state

    before = json.loads(load_state(RunFolder(part).latest_checkpoint())["report"])["seconds"]
    result = runner.invoke(app, ["sparsify", "--resume", str(part)])
    assert result.exit_code == 0, result.output
    a = json.loads((whole / "report.json").read_text())
    b = json.loads((part / "report.json").read_text())
    assert b["resumed_at_step"] == resumed_at
    assert b["seconds"] > before > 0  # the interrupted part's seconds count too
    assert [h["step"] for h in b["history"]] == list(range(1, steps + 1))
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["lm_loss"] == pytest.approx(ha["lm_loss"], abs=1e-6)
        assert hb["l1"] == pytest.approx(ha["l1"], abs=1e-6)
        assert hb["lam"] == ha["lam"]
    for sa, sb in zip(a["stage_ends"], b["stage_ends"]):
        assert sb["perplexity"] == pytest.approx(sa["perplexity"], rel=1e-6)
    assert b["sparsity"] == pytest.approx(a["sparsity"], abs=1e-6)
    assert not (part / "checkpoint").exists()


def test_resume_continues_with_the_same_losses(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """Interrupt after 5 of 8 steps (checkpoints every 2), resume: the loss curve, the stage-end
    measurements and the final model equal those of an uninterrupted run."""
    import prosparse_fx.training.loop as loop

    config = _config(tmp_path, stages=[[0.0, 3], [0.5, 5], [1.0, 8]], checkpoint_every=2)
    whole = tmp_path / "whole"
    assert runner.invoke(app, _run_args(tiny_model_dir, text_file, config, whole)).exit_code == 0

    part = tmp_path / "part"
    real_train = loop.train

    def interrupted_train(*args, **kw):
        if kw["end_step"] > 5:
            raise KeyboardInterrupt  # killed during step 6; the last checkpoint is at step 5
        return real_train(*args, **kw)

    monkeypatch.setattr("prosparse_fx.training.trainer.train", interrupted_train)
    result = runner.invoke(app, _run_args(tiny_model_dir, text_file, config, part))
    assert result.exit_code == 130  # typer turns KeyboardInterrupt into exit 130
    assert not (part / "report.json").exists()
    monkeypatch.setattr("prosparse_fx.training.trainer.train", real_train)

    _assert_resume_matches(whole, part, resumed_at=5, steps=8)


def test_resume_refuses_a_different_config_or_nothing(tmp_path, tiny_model_dir, text_file) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["sparsify", "--resume", str(empty)])
    assert result.exit_code == 2 and "nothing to resume" in result.output

    from prosparse_fx.run_folder import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    from prosparse_fx.pipeline import fingerprint

    report = {"config": {**FAST, "seed": 0}, "model": str(tiny_model_dir), "data": str(text_file)}
    report["data_fingerprint"] = fingerprint(text_file)
    state = {k: "" for k in ("optimizer", "lr_schedule", "data", "rng", "history", "stage_ends")}
    state.update({"report": json.dumps(report), "step": 1})
    checkpoint = RunFolder(out).save_checkpoint(1, lambda folder: None, state)
    other = _config(tmp_path, seed=3)
    result = runner.invoke(app, ["sparsify", "--resume", str(out), "--config", str(other)])
    assert result.exit_code == 2
    assert "config differs" in result.output and "seed: checkpoint 0, now 3" in result.output
    result = runner.invoke(app, ["sparsify", "--resume", str(out), "--model", str(text_file)])
    assert result.exit_code == 2 and "the model differs" in result.output
    result = runner.invoke(app, ["sparsify", "--resume", str(out), "--tokenizer", str(out)])
    assert result.exit_code == 2, result.output
    assert "the tokenizer differs" in result.output and "model folder's own" in result.output
    (checkpoint / "training_state.pt").write_bytes(b"garbage")
    result = runner.invoke(app, ["sparsify", "--resume", str(out)])
    assert result.exit_code == 2 and "and start a new run" in result.output
    torch.save([1, 2], checkpoint / "training_state.pt")
    result = runner.invoke(app, ["sparsify", "--resume", str(out)])
    assert (
        result.exit_code == 2 and "not a complete prosparse-fx sparsify checkpoint" in result.output
    )


def test_sigterm_stops_with_a_checkpoint_and_resume_matches(
    tmp_path, tiny_model_dir, text_file, monkeypatch
):
    """A real SIGTERM to this process during step 5 of 8, with no interval checkpoint due
    (checkpoint_every 1000): the run finishes step 5, writes its checkpoint and exits 143; the
    resumed run's losses and final sparsity equal an uninterrupted run's."""
    import signal

    import prosparse_fx.training.loop as loop
    from tests.preempt import sigterm_at_step

    config = _config(tmp_path, stages=[[0.0, 3], [0.5, 8]], checkpoint_every=1000)
    whole = tmp_path / "whole"
    assert runner.invoke(app, _run_args(tiny_model_dir, text_file, config, whole)).exit_code == 0

    real_train = loop.train
    monkeypatch.setattr("prosparse_fx.training.trainer.train", sigterm_at_step(real_train, 5))
    part = tmp_path / "part"
    result = runner.invoke(app, _run_args(tiny_model_dir, text_file, config, part))
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "stopped by SIGTERM after step 5" in result.output and "--resume" in result.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
    monkeypatch.setattr("prosparse_fx.training.trainer.train", real_train)

    _assert_resume_matches(whole, part, resumed_at=5, steps=8)


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path, tiny_model_dir, text_file) -> None:
    """While a run holds its folder, --overwrite or --resume into it is refused (exit 2) and
    the folder is left as it was; once the lock is released the folder can be used again."""
    from prosparse_fx.run_folder import folder_lock

    config = _config(tmp_path, stages=[[0.0, 2], [1.0, 4]], checkpoint_every=2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("an earlier run's")
    with folder_lock(out):
        args = _run_args(tiny_model_dir, text_file, config, out) + ["--overwrite"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "another prosparse-fx run is writing to" in result.output
        assert sorted(p.name for p in out.iterdir()) == ["report.json"]
        assert (out / "report.json").read_text() == "an earlier run's"
    assert runner.invoke(app, args).exit_code == 0
    assert (out / "report.json").is_file()


def test_a_bad_crossover_variable_exits_2_before_any_command(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PROSPARSE_CPU_CROSSOVER", "70%")
    result = runner.invoke(app, ["sparsify", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert (
        "PROSPARSE_CPU_CROSSOVER must be an active fraction in [0, 1], got '70%'" in result.output
    )
    assert not (tmp_path / "run").exists()


def test_an_unreadable_output_folder_is_named(tmp_path, monkeypatch) -> None:
    """A folder the user cannot list (simulated: tests run as root) is refused with the fix."""
    import os
    from pathlib import Path

    from prosparse_fx import run_folder
    from prosparse_fx.errors import InputError

    out = tmp_path / "locked_out"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        run_folder.os,
        "access",
        lambda p, mode: False if Path(p) == out and mode & os.R_OK else real_access(p, mode),
    )
    with pytest.raises(InputError, match=r"cannot read the output folder .*locked_out"):
        run_folder.check_output_dir(out, overwrite=True, inputs=[])


def test_sparsify_with_drelu_and_a_perplexity_budget(tmp_path, tiny_model_dir, text_file) -> None:
    """activation 'drelu' and threshold_mode 'budget': the saved model is the dReLU model with
    the chosen per-layer thresholds (reloads to the measured perplexity), and the report says
    what the budget chose."""
    import prosparse_fx  # noqa: F401  (hidden_act="drelu" for from_pretrained)
    from prosparse_fx.data import load_documents, split_documents, spread, token_windows
    from prosparse_fx.measure import evaluate
    from prosparse_fx.models import load_tokenizer

    out = tmp_path / "out"
    config = _config(
        tmp_path,
        activation="drelu",
        threshold_mode="budget",
        threshold_budget=1.1,
        stages=[[0.0, 2], [0.5, 4]],
    )
    result = runner.invoke(app, _run_args(tiny_model_dir, text_file, config, out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    choice = report["threshold_calibration"]
    assert report["thresholds"] == choice["thresholds"]
    assert choice["calib_perplexity"] <= 1.1 * choice["unshifted_perplexity"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["hidden_act"] == "drelu"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = load_tokenizer(out)
    held = split_documents(load_documents(text_file), seed=0).held_out
    windows = spread(token_windows(tok, held, 32), 2)
    again = evaluate(model, windows)
    assert again.perplexity == pytest.approx(report["perplexity"], rel=1e-4)
    assert again.sparsity.sparsity == pytest.approx(report["sparsity"], abs=1e-6)


def test_drelu_on_a_model_without_up_projection_exits_2(tmp_path, text_file, smollm2) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = smollm2
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    config = _config(tmp_path, activation="drelu")
    result = runner.invoke(app, _run_args(folder, text_file, config, tmp_path / "o"))
    assert result.exit_code == 2 and "activation 'relu'" in result.output, result.output
    assert not (tmp_path / "o" / "checkpoint").exists()
