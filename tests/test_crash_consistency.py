"""Crash consistency of every writer (issue 13): ``sparsify`` stopped at each step of its save
sequences and at points of training, by SIGKILL, SIGTERM or an in-process crash that skips all
clean-up (``PROSPARSE_FX_FAILPOINT``, see :mod:`prosparse_fx.atomic`); ``export`` killed
between its renames. After each stop the invariants hold: ``--resume`` works (and ends with the
uninterrupted run's result), or the folder holds a whole earlier result; nothing half-written is
taken as done; no temporary entry is left after the next run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prosparse_fx.atomic import FAILPOINT_ENV, TEMP_PREFIX, SimulatedCrash, reset_failpoints
from prosparse_fx.config import SparsifyConfig
from prosparse_fx.errors import InputError
from prosparse_fx.pipeline import run_sparsify
from prosparse_fx.run_folder import JOURNAL, PREVIOUS, SET_ASIDE, RunFolder, check_complete

FAST = {
    "eval_windows": 2,
    "calib_windows": 2,
    "sweep_thresholds": [0.0, 0.1],
    "seq_len": 16,
    "batch_size": 2,
    "stages": [[0.0, 2], [0.5, 4]],
    "checkpoint_every": 1,  # four checkpoint saves: after steps 1, 2 (stage end), 3, 4 (end)
    "precision": "fp32",
}


@pytest.fixture(scope="module")
def tiny_model_dir(word_llama):
    return word_llama[0]


@pytest.fixture(scope="module")
def text_file(word_llama):
    return word_llama[1]


def _run(out, model, data, **kw):
    return run_sparsify(
        out,
        SparsifyConfig.from_dict(dict(FAST)) if not kw.get("resume") else None,
        model_path=model if not kw.get("resume") else None,
        data_path=data if not kw.get("resume") else None,
        show_progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, text_file):
    """The uninterrupted run: its report and weights."""
    out = tmp_path_factory.mktemp("reference") / "run"
    report = _run(out, tiny_model_dir, text_file)
    return out, report, load_file(out / "model.safetensors")


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX) or p.name == JOURNAL]


def _assert_whole_result(out: Path, reference) -> None:
    """``out`` holds the whole final result, equal to the uninterrupted run's, and nothing
    else of a run (no checkpoint, no journal, no temporaries, no earlier run set aside)."""
    _, ref_report, ref_weights = reference
    check_complete(out)
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_constants)
    assert report["status"] == "done"
    assert [h["step"] for h in report["history"]] == [1, 2, 3, 4]
    for a, b in zip(ref_report["history"], report["history"]):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], abs=1e-6)
        assert b["l1"] == pytest.approx(a["l1"], abs=1e-6)
    assert report["sparsity"] == pytest.approx(ref_report["sparsity"], abs=1e-6)
    assert report["perplexity"] == pytest.approx(ref_report["perplexity"], rel=1e-6)
    weights = load_file(out / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6)
    for name in ("config.json", "tokenizer.json", "training.png", "per_layer_sparsity.png"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists() and not (out / PREVIOUS).exists()
    assert _temporaries(out) == []


def _no_constants(name):
    raise AssertionError(f"report.json holds {name}, which strict JSON parsers reject")


def _crash(monkeypatch, point: str, *args, **kw) -> None:
    monkeypatch.setenv(FAILPOINT_ENV, f"{point}:raise")
    reset_failpoints()
    try:
        with pytest.raises(SimulatedCrash):
            _run(*args, **kw)
    finally:
        monkeypatch.delenv(FAILPOINT_ENV)
        reset_failpoints()


def _assert_not_done_unless_whole(out: Path) -> None:
    """What a reader sees right after a crash: a "done" report only beside the whole result;
    an interrupted final save refused by name."""
    if (out / JOURNAL).exists() or (out / SET_ASIDE).exists():
        with pytest.raises(InputError, match="interrupted"):
            check_complete(out)
        return
    report = out / "report.json"
    if report.is_file() and json.loads(report.read_text())["status"] == "done":
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)  # whole: loads without missing weights


# Every step of the save sequences, and training steps; the n-th pass where a point repeats.
SAVE_SEQUENCE = [
    "checkpoint.model_written@1",
    "checkpoint.state_written@1",
    "checkpoint.in_place@1",
    "checkpoint.model_written@2",
    "checkpoint.state_written@3",
    "checkpoint.in_place@3",
    "checkpoint.old_removed@1",
    "checkpoint.old_removed@3",
    "train.step@1",
    "train.step@3",
    "atomic_file.written@1",
    "atomic_file.written@3",
    "result.staged",
    "result.journaled",
    "result.moved@1",
    "result.moved@5",
    "result.checkpoints_removed",
]


@pytest.mark.parametrize("point", SAVE_SEQUENCE)
def test_a_crash_at_each_step_then_resume_gives_the_whole_result(
    point, tmp_path, tiny_model_dir, text_file, reference, monkeypatch
) -> None:
    out = tmp_path / "run"
    _crash(monkeypatch, point, out, tiny_model_dir, text_file)
    _assert_not_done_unless_whole(out)
    run = RunFolder(out)
    if run.latest_checkpoint() is None and not (out / JOURNAL).exists():
        # killed before its first checkpoint: nothing to resume, and a new run may use the folder
        with pytest.raises(InputError, match="nothing to resume"):
            _run(out, None, None, resume=True)
        _run(out, tiny_model_dir, text_file)
    else:
        _run(out, None, None, resume=True)
    _assert_whole_result(out, reference)


def test_a_crash_over_an_earlier_run_never_mixes_the_two(
    tmp_path, tiny_model_dir, text_file, reference, monkeypatch
) -> None:
    """--overwrite over a finished run: the earlier run (the files its report lists) is set
    aside whole, a crash while it is moved aside or during training leaves it whole in
    previous-run/ (never mixed with the new run's files), the next --overwrite run ends with
    only the new result, and a file the run did not write stays in place throughout."""
    ref_out = reference[0]
    for point in ("set_aside.moved@2", "train.step@3", "result.moved@2"):
        out = tmp_path / point.replace("@", "-")
        shutil.copytree(ref_out, out)
        earlier_report = json.loads((ref_out / "report.json").read_text())
        assert "model.safetensors" in earlier_report["files"]
        (out / "report.json").write_text(json.dumps({**earlier_report, "from": "earlier"}))
        (out / "my-notes.txt").write_text("mine")  # not the run's: stays where it is
        _crash(monkeypatch, point, out, tiny_model_dir, text_file, overwrite=True)
        _assert_not_done_unless_whole(out)
        if point == "train.step@3":
            earlier = out / PREVIOUS
            assert json.loads((earlier / "report.json").read_text())["from"] == "earlier"
            assert (earlier / "model.safetensors").is_file()
            assert not (out / "model.safetensors").exists()  # no new weights beside old files
            assert not (out / "report.json").exists()
        assert (out / "my-notes.txt").read_text() == "mine"
        _run(out, tiny_model_dir, text_file, overwrite=True)
        _assert_whole_result(out, reference)
        assert (out / "my-notes.txt").read_text() == "mine"


def test_a_second_run_started_meanwhile_cannot_replace_a_finished_one(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """Problem 4: the emptiness check is repeated under the folder's lock, so a run that found
    the folder empty but took it after another run finished there is refused."""
    import prosparse_fx.run_folder as rf

    out = tmp_path / "run"
    real = rf.check_output_dir

    def finished_meanwhile(*args, **kw):
        path = real(*args, **kw)
        path.mkdir(parents=True, exist_ok=True)
        (path / "report.json").write_text('{"status": "done"}')
        return path

    monkeypatch.setattr(rf, "check_output_dir", finished_meanwhile)
    with pytest.raises(InputError, match="exists and is not empty"):
        _run(out, tiny_model_dir, text_file)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_leftovers_of_a_killed_run_do_not_make_a_folder_look_used(
    tmp_path, tiny_model_dir, text_file, reference
) -> None:
    """Problem 7: a folder holding only a killed writer's temporaries takes a fresh run, which
    removes them (also those of earlier versions: .save-*, .checkpoint-*)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f"{TEMP_PREFIX}999999-abcd-result").mkdir()
    (out / f"{TEMP_PREFIX}999999-abcd-result" / "model.safetensors").write_bytes(b"half")
    (out / ".save-x1y2").mkdir()
    _run(out, tiny_model_dir, text_file)
    _assert_whole_result(out, reference)
    assert not (out / ".save-x1y2").exists()


def _break_weights_after(monkeypatch, step: int, how) -> None:
    import prosparse_fx.training.trainer as trainer

    real_train = trainer.train

    def train(*args, **kw):
        logs = real_train(*args, **kw)
        if kw["end_step"] == step:
            with torch.no_grad():
                how(args[0])
        return logs

    monkeypatch.setattr(trainer, "train", train)


def test_nan_keeps_the_last_finite_checkpoint_and_names_it(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """Problem 5: weights that after step 2 are finite but give a NaN loss (an LM head of
    3e38s overflows the logits) are never checkpointed; the run stops naming the checkpoint of
    step 1, which exists and holds finite weights, and report.json (strict JSON) says
    diverged."""
    from prosparse_fx.training.loop import NonFiniteLossError

    _break_weights_after(monkeypatch, 2, lambda model: model.lm_head.weight.fill_(3e38))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        _run(out, tiny_model_dir, text_file)
    kept = RunFolder(out).latest_checkpoint()
    assert kept is not None and kept.name.endswith("-step-1")
    assert str(kept) in str(err.value) and "lower lr" in str(err.value)
    weights = load_file(kept / "model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in weights.values())
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_constants)
    assert report["status"] == "diverged" and report["last_good_checkpoint"] == str(kept)


def test_nan_before_the_first_checkpoint_says_there_is_none(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """NaN weights after step 1: no checkpoint is written, and the message says so instead of
    naming a folder that does not exist."""
    from prosparse_fx.training.loop import NonFiniteLossError

    _break_weights_after(monkeypatch, 1, lambda model: model.lm_head.weight.fill_(float("nan")))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="nothing to resume") as err:
        _run(out, tiny_model_dir, text_file)
    assert "no checkpoint with finite weights" in str(err.value)
    assert RunFolder(out).latest_checkpoint() is None
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_constants)
    assert report["status"] == "diverged" and report["last_good_checkpoint"] is None
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_a_full_disk_at_a_checkpoint_names_the_space_and_keeps_the_last_one(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """Problem 16: torch.save failing as it does on a full disk ("basic_ios::clear: iostream
    error") at the third checkpoint: exit 2 naming the free space and the kept checkpoint."""
    from typer.testing import CliRunner

    import prosparse_fx.run_folder as rf
    from prosparse_fx.cli import app

    real_save, calls = torch.save, [0]

    def full_disk(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(rf.torch, "save", full_disk)
    monkeypatch.setattr(
        "prosparse_fx.atomic.shutil.disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 5 << 20)
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps(FAST))
    out = tmp_path / "run"
    args = ["sparsify", "--model", str(tiny_model_dir), "--data", str(text_file)]
    result = CliRunner().invoke(app, [*args, "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "no space left on the device (5 MiB free)" in result.output
    kept = RunFolder(out).latest_checkpoint()
    assert kept is not None and kept.name.endswith("-step-2") and str(kept) in result.output
    assert _temporaries(out) == []


def test_a_tokenizer_that_cannot_be_saved_is_refused_before_training(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """Problem 19."""
    from transformers import PreTrainedTokenizerBase

    def unsaveable(self, *a, **kw):
        raise TypeError("Object of type set is not JSON serializable")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", unsaveable)
    trained = []
    monkeypatch.setattr("prosparse_fx.training.trainer.train", lambda *a, **k: trained.append(1))
    out = tmp_path / "run"
    with pytest.raises(InputError, match="tokenizer cannot be saved.*--tokenizer"):
        _run(out, tiny_model_dir, text_file)
    assert trained == [] and not out.exists()  # nothing written, the folder it made removed


def _interrupted(tmp_path, model, data, monkeypatch, step=3) -> Path:
    out = tmp_path / "run"
    _crash(monkeypatch, f"train.step@{step}", out, model, data)
    return out


def _forged_moments(optimizer: dict, value) -> dict:
    state = {k: dict(v) for k, v in optimizer["state"].items()}
    first = next(iter(state))
    moment = state[first]["exp_avg"]
    state[first]["exp_avg"] = value if value is not None else torch.full_like(moment, torch.nan)
    return {**optimizer, "state": state}


def _forged_lr(optimizer: dict, lr: float) -> dict:
    return {**optimizer, "param_groups": [{**g, "lr": lr} for g in optimizer["param_groups"]]}


def test_resume_refuses_forged_checkpoint_values(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """Problem 8: a checkpoint with the right keys but values this run could not have written
    (step -5 or 10^6, stage ends or history that do not fit the schedule, a wrong RNG state, a
    state that does not fit the optimizer) is refused with exit 2, naming the value."""
    out = _interrupted(tmp_path, tiny_model_dir, text_file, monkeypatch)
    kept = RunFolder(out).latest_checkpoint()
    state_file = kept / "training_state.pt"
    good = torch.load(state_file, weights_only=True)
    stage_end = json.loads(good["stage_ends"])[0]
    forged = {
        "step -5": ({"step": -5}, r"step -5 is not a whole number in \[0, 4\]"),
        "step 10**6": ({"step": 10**6}, r"step 1000000 is not a whole number"),
        "step 2.0": ({"step": 2.0}, r"step 2.0 is not a whole number"),
        "stage end moved": (
            {"stage_ends": json.dumps([{**stage_end, "step": 1}])},
            r"stage_ends\[0\] is not the measurement of stage 0 at step 2",
        ),
        "stage end NaN": (
            {"stage_ends": json.dumps([{**stage_end, "perplexity": float("nan")}])},
            r"stage_ends\[0\]",
        ),
        "all stages done": (
            {"stage_ends": json.dumps([stage_end, {**stage_end, "stage": 1, "step": 4}])},
            "do not match step 2",
        ),
        "history short": ({"history": "[]"}, "history holds 0 steps, its step is 2"),
        "rng": ({"rng": torch.zeros(3)}, "rng is not a CPU generator state"),
        "optimizer": (
            {"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}},
            "does not fit this run",
        ),
        # found by a fresh review: optimizer states and data positions that loaded silently
        "empty optimizer state": (
            {"optimizer": {**good["optimizer"], "state": {}}},
            "optimizer state is empty after 2 steps",
        ),
        "moment shape": (
            {"optimizer": _forged_moments(good["optimizer"], torch.zeros(3, 3))},
            r"optimizer exp_avg has shape \(3, 3\)",
        ),
        "NaN moments": (
            {"optimizer": _forged_moments(good["optimizer"], None)},
            "optimizer exp_avg is not finite",
        ),
        "NaN lr": (
            {"optimizer": _forged_lr(good["optimizer"], float("nan"))},
            "optimizer lr nan is not a finite number",
        ),
        "data position -1": ({"data": {**good["data"], "index": -1}}, r"data position -1"),
        "data position 10**12": (
            {"data": {**good["data"], "index": 10**12}},
            r"data position 1000000000000 is not in",
        ),
    }
    for name, (change, message) in forged.items():
        torch.save({**good, **change}, state_file)
        with pytest.raises(InputError, match=message):
            _run(out, None, None, resume=True)
        assert kept.is_dir(), name  # refused, nothing deleted
    torch.save(good, state_file)
    _run(out, None, None, resume=True)  # the genuine state resumes


def test_resume_takes_a_moved_model_folder(
    tmp_path, tiny_model_dir, text_file, monkeypatch, reference
) -> None:
    """Problem 9: the checkpoint holds the whole model, so a moved input folder is no obstacle;
    `--model NEW` is accepted when its fingerprint equals the recorded one, refused otherwise."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = _interrupted(tmp_path, model, text_file, monkeypatch)
    moved = tmp_path / "moved-model"
    model.rename(moved)
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    (other / "config.json").write_text(
        (other / "config.json")
        .read_text()
        .replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    )
    with pytest.raises(InputError, match="the model differs.*fingerprints differ"):
        run_sparsify(out, resume=True, model_path=other, show_progress=False)
    report = run_sparsify(out, resume=True, model_path=moved, show_progress=False)
    assert report["model"] == str(moved.resolve())
    _assert_whole_result(out, reference)


def test_resume_without_the_moved_model_folder(
    tmp_path, tiny_model_dir, text_file, monkeypatch, reference
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = _interrupted(tmp_path, model, text_file, monkeypatch, step=2)
    shutil.rmtree(model)
    _run(out, None, None, resume=True)
    _assert_whole_result(out, reference)


def test_strict_json_reports(tmp_path) -> None:
    """Problem 20: NaN and infinities are written as null, never as NaN/Infinity."""
    from prosparse_fx.atomic import write_json

    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": "x"})
    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constants)
    assert data == {"a": None, "b": [None, 1.5], "c": "x"}


# -- real signals, in a separate process ------------------------------------------------------


def _cli(args: list[str], point: str | None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(FAILPOINT_ENV, None)
    if point:
        env[FAILPOINT_ENV] = point
    code = "from prosparse_fx.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("point", "returncode"),
    [
        ("checkpoint.in_place@2:kill", -signal.SIGKILL),
        ("result.moved@2:term", -signal.SIGTERM),  # no handler there: SIGTERM's default
        ("train.step@3:term", 128 + signal.SIGTERM),  # handled: checkpoint, then exit 143
    ],
)
def test_real_signals_then_resume(
    point, returncode, tmp_path, tiny_model_dir, text_file, reference
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps(FAST))
    out = tmp_path / "run"
    args = ["sparsify", "--model", str(tiny_model_dir), "--data", str(text_file)]
    done = _cli([*args, "--config", str(config), "--out", str(out)], point)
    assert done.returncode == returncode, done.stderr[-2000:]
    _assert_not_done_unless_whole(out)
    _run(out, None, None, resume=True)
    _assert_whole_result(out, reference)


# The write step of export_onnx with a stand-in for the exported program: a small ONNX model
# (one 4096-float weight in an external-data file) tagged with the run's name.
_EXPORT = """
import sys
from pathlib import Path
import numpy as np
import onnx
from onnx import helper, numpy_helper
from prosparse_fx.onnx.export import _save

class Program:
    def save(self, path, external_data):
        weight = numpy_helper.from_array(np.full(4096, len(sys.argv[2]), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])], "g", [],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])], [weight],
        )
        model = helper.make_model(graph)
        helper.set_model_props(model, {"run": sys.argv[2]})
        onnx.save_model(model, str(path), save_as_external_data=external_data,
                        location=Path(path).name + ".data", size_threshold=0)

_save(Program(), Path(sys.argv[1]), True, True)
"""


def _export(target, tag, point=None) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop(FAILPOINT_ENV, None)
    if point:
        env[FAILPOINT_ENV] = point
    return subprocess.run(
        [sys.executable, "-c", _EXPORT, str(target), tag],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_export_killed_between_its_renames_keeps_a_whole_pair(tmp_path) -> None:
    """Problems 6/7 for export: SIGKILL after the new weights file is in place but before the
    new .onnx is, and after the .onnx is written but before its rename: the earlier export
    (model and weights) is intact and loads; the next export removes what the killed ones left
    (its weights file, its temporaries) and leaves one whole pair."""
    import onnx
    import onnxruntime as ort

    target = tmp_path / "m.onnx"

    def run_and_tag() -> tuple[str, float]:
        proto = onnx.load(str(target), load_external_data=False)
        tag = {p.key: p.value for p in proto.metadata_props}["run"]
        (y,) = ort.InferenceSession(str(target)).run(None, {})
        return tag, float(y[0])

    first = _export(target, "first")
    assert first.returncode == 0, first.stderr[-2000:]
    assert run_and_tag() == ("first", 5.0)
    for point in ("export.data_in_place:kill", "atomic_file.written:kill"):
        killed = _export(target, "second", point)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        assert run_and_tag() == ("first", 5.0)  # the earlier pair, whole
    assert len(list(tmp_path.iterdir())) > 2  # what the kills left
    third = _export(target, "third")
    assert third.returncode == 0, third.stderr[-2000:]
    assert run_and_tag() == ("third", 5.0)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "m.onnx", names
    assert re.fullmatch(r"m\.onnx\.[0-9a-f]{8}\.data", names[1])


def test_a_concurrent_export_to_a_new_name_is_refused_not_replaced(tmp_path, monkeypatch) -> None:
    """Problem 6: another export finishes the same new file while this one runs: this one is
    refused (exit 2, naming --overwrite) and the other's file is kept."""
    from typer.testing import CliRunner

    from prosparse_fx.cli import app
    from tests.models import tiny

    model = tiny("llama")
    from prosparse_fx import relufy_

    relufy_(model)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    target = tmp_path / "m.onnx"
    real_save = torch.onnx.ONNXProgram.save

    def meanwhile(self, path, **kw):
        real_save(self, path, **kw)
        target.write_bytes(b"the other export")

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", meanwhile)
    result = CliRunner().invoke(app, ["export", str(folder), "--out", str(target), "--no-cache"])
    assert result.exit_code == 2, result.output
    assert "written by another process" in result.output and "--overwrite" in result.output
    assert target.read_bytes() == b"the other export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "model"]


def test_new_folder_removes_dead_writers_leftovers_and_keeps_a_concurrent_result(
    tmp_path,
) -> None:
    """Problem 7 for the GGUF cache (which converts through ``new_folder``): a killed
    conversion's temporary (a dead process id) is removed by the next one; a live writer's is
    kept; when another writer finishes the same folder first, its folder is kept."""
    from prosparse_fx.atomic import new_folder

    dead = tmp_path / f"{TEMP_PREFIX}999999-0000-model"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half of 514 MB")
    live = tmp_path / f"{TEMP_PREFIX}{os.getppid()}-0000-model"  # the parent process is alive
    live.mkdir()
    with new_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dead.exists() and live.exists()
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    with new_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text('{"second": 1}')
    assert (tmp_path / "model" / "config.json").read_text() == "{}"  # the first one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]


def test_readers_refuse_an_interrupted_final_save(
    tmp_path, tiny_model_dir, text_file, monkeypatch, reference
) -> None:
    """A crash while the result is moved in: `measure` (and every loader) refuses the folder,
    naming the `--resume` command, which then completes the result."""
    from typer.testing import CliRunner

    from prosparse_fx.cli import app

    out = tmp_path / "run"
    _crash(monkeypatch, "result.moved@3", out, tiny_model_dir, text_file)
    result = CliRunner().invoke(app, ["measure", str(out), "--data", str(text_file)])
    assert result.exit_code == 2, result.output
    assert f"sparsify --resume {out}" in result.output
    resumed = CliRunner().invoke(app, ["sparsify", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    _assert_whole_result(out, reference)


def test_two_crashes_in_a_row_leave_a_checkpoint_to_resume(
    tmp_path, tiny_model_dir, text_file, monkeypatch, reference
) -> None:
    """Problem 2: a crash after a checkpoint is in place, then, in the resumed run, a crash in
    the middle of the next save: the complete checkpoint is never deleted before its successor
    is in place, so the third attempt resumes and ends with the uninterrupted result."""
    out = tmp_path / "run"
    _crash(monkeypatch, "checkpoint.in_place@2", out, tiny_model_dir, text_file)
    first = RunFolder(out).latest_checkpoint()
    assert first is not None and first.name.endswith("-step-2")
    _crash(monkeypatch, "checkpoint.state_written@1", out, None, None, resume=True)
    assert RunFolder(out).latest_checkpoint() == first
    _crash(monkeypatch, "checkpoint.old_removed@1", out, None, None, resume=True)
    assert RunFolder(out).latest_checkpoint().name.endswith("-step-3")
    _run(out, None, None, resume=True)
    _assert_whole_result(out, reference)


def test_an_output_name_too_long_for_the_file_system_exits_2(tmp_path) -> None:
    """Problem 18: a --out component over 255 bytes is named before any work."""
    from typer.testing import CliRunner

    from prosparse_fx.cli import app

    out = tmp_path / ("x" * 300)
    result = CliRunner().invoke(app, ["sparsify", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "300 bytes long" in result.output and "shorter --out" in result.output
    assert os.listdir(tmp_path) == []


def test_gguf_cache_removes_temporaries_of_earlier_versions(tmp_path) -> None:
    """Problem 7: a ``.tmp-*`` folder left by a killed conversion of an earlier version is
    removed once it is an hour old; a recent one (perhaps live) is kept."""
    from prosparse_fx.models import _remove_legacy_temporaries

    old, recent = tmp_path / ".tmp-abc", tmp_path / ".tmp-def"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    os.utime(old, (1e9, 1e9))
    _remove_legacy_temporaries(tmp_path)
    assert not old.exists() and recent.exists()


def test_review_findings_exit_2_naming_the_problem(tmp_path, tiny_model_dir, text_file) -> None:
    """Found by a fresh review: a config nested too deep, an --out name that is not UTF-8, and
    windows longer than a learned-position model's table, each exit 2 naming the problem."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from typer.testing import CliRunner

    from prosparse_fx.cli import app
    from tests.models import WORDS, word_tokenizer

    runner = CliRunner()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    base = ["sparsify", "--model", str(tiny_model_dir), "--data", str(text_file)]
    result = runner.invoke(app, [*base, "--config", str(deep), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "nested too deep" in result.output, result.output
    bad_name = os.fsdecode(str(tmp_path).encode() + b"/bad\xffname")
    result = runner.invoke(app, [*base, "--out", bad_name])
    assert result.exit_code == 2 and "not UTF-8" in result.output, result.output
    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(gpt2)
    word_tokenizer().save_pretrained(gpt2)
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({**FAST, "seq_len": 32}))
    args = ["sparsify", "--model", str(gpt2), "--data", str(text_file), "--config"]
    result = runner.invoke(app, [*args, str(config_file), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "exceeds the 16 positions" in result.output, result.output
    assert not (tmp_path / "g").exists()
    result = runner.invoke(app, ["measure", str(gpt2), "--data", str(text_file), "--seq-len", "32"])
    assert result.exit_code == 2 and "of 16 or less" in result.output, result.output


def test_resume_with_distillation_smooth_substitution_and_decay_matches_the_whole_run(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """The trainer's options are part of the state a resume rebuilds: the teacher (loaded
    again from the original model), the blend step and the decayed learning rate. A crash at
    step 3 of 4, then ``--resume``, ends where the uninterrupted run ends."""
    options = {**FAST, "distill": 0.5, "distill_temperature": 2.0, "substitution": 1.0}
    options.update(lr_decay="cosine", min_lr_ratio=0.2, stages=[[0.0, 3], [0.5, 4]])

    def run(out, **kw):
        config = None if kw.get("resume") else SparsifyConfig.from_dict(dict(options))
        return run_sparsify(
            out,
            config,
            model_path=None if kw.get("resume") else tiny_model_dir,
            data_path=None if kw.get("resume") else text_file,
            show_progress=False,
            **kw,
        )

    whole = run(tmp_path / "whole")
    assert all(h["kl"] is not None and h["kl"] >= 0 for h in whole["history"])
    assert whole["history"][0]["kl"] < whole["history"][2]["kl"]  # blend: SiLU first, then ReLU
    out = tmp_path / "crashed"
    monkeypatch.setenv(FAILPOINT_ENV, "train.step@3:raise")
    reset_failpoints()
    with pytest.raises(SimulatedCrash):
        run(out)
    monkeypatch.delenv(FAILPOINT_ENV)
    reset_failpoints()
    resumed = run(out, resume=True)
    for a, b in zip(whole["history"], resumed["history"]):
        for key in ("lm_loss", "l1", "kl"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    assert resumed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    ood = resumed["out_of_domain"]
    assert set(ood) == {"shakespeare", "python-docs"}
    for name, entry in ood.items():
        base = resumed["out_of_domain_baseline"][name]
        assert entry["baseline"] == base
        assert entry["perplexity_ratio"] == pytest.approx(
            entry["final"]["perplexity"] / base["perplexity"]
        )


def test_resuming_a_distillation_run_after_its_original_model_moved(
    tmp_path, tiny_model_dir, text_file, monkeypatch
) -> None:
    """The teacher is reloaded from the original model on resume: when that folder is gone, the
    refusal names it and says to pass --model; with --model NEW (same fingerprint) it resumes."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    options = {**FAST, "distill": 0.5, "stages": [[0.0, 3], [0.5, 4]]}
    out = tmp_path / "crashed"
    monkeypatch.setenv(FAILPOINT_ENV, "train.step@3:raise")
    reset_failpoints()
    with pytest.raises(SimulatedCrash):
        run_sparsify(
            out,
            SparsifyConfig.from_dict(options),
            model_path=model,
            data_path=text_file,
            show_progress=False,
        )
    monkeypatch.delenv(FAILPOINT_ENV)
    reset_failpoints()
    moved = tmp_path / "moved-model"
    model.rename(moved)
    with pytest.raises(InputError, match=r"distils from its original model .* pass --model"):
        run_sparsify(out, resume=True, show_progress=False)
    report = run_sparsify(out, resume=True, model_path=moved, show_progress=False)
    assert report["status"] == "done" and report["model"] == str(moved.resolve())
    assert all(h["kl"] is not None for h in report["history"])
