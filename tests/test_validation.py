"""One validation layer (issue 13, problems 12, 13 and 17): config values, devices and the
torchrun environment are checked before any long work; each bad value exits 2 with a message
that names the field or variable, the value given and what is accepted."""

import json
import logging
import socket
import time

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from prosparse_fx.cli import app
from prosparse_fx.config import PRESETS, SparsifyConfig
from prosparse_fx.environment import check_device
from prosparse_fx.errors import InputError
from prosparse_fx.training.distributed import init_from_env
from prosparse_fx.training.schedule import ProSparseSchedule

runner = CliRunner()
FAST = {
    "eval_windows": 2,
    "calib_windows": 2,
    "sweep_thresholds": [0.0, 0.1],
    "seq_len": 32,
    "batch_size": 2,
    "stages": [[0.0, 1], [0.1, 2]],
}
RENDEZVOUS_TIMEOUT_ENV = "PROSPARSE_FX_RENDEZVOUS_TIMEOUT"
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    """No torchrun variables and no process group (another test file in this worker may have
    left one): each test sets exactly what it needs; no group is left behind."""
    for name in (*TORCHRUN_VARS, RENDEZVOUS_TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    if dist.is_initialized():
        dist.destroy_process_group()
    yield monkeypatch
    assert not dist.is_initialized()


def _sparsify(tmp_path, tiny_model_dir, text_file, *extra, config=None):
    """Run the CLI on the tiny model; returns (result, out folder)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**FAST, **(config or {})}))  # json writes inf as Infinity
    out = tmp_path / "out"
    args = ["sparsify", "--model", str(tiny_model_dir), "--data", str(text_file)]
    result = runner.invoke(app, [*args, "--out", str(out), "--config", str(path), *extra])
    return result, out


# --- problem 12: config values -------------------------------------------------------------

# (config fields, substrings the message must hold: the field, the value given, the range)
BAD_CONFIGS = [
    ({"stages": [[0.0, 1], [0.1, float("inf")]]}, ["stages[1]", "inf", "whole number", "<="]),
    ({"stages": [[0.0, 1], [0.1, 2.7]]}, ["stages[1]", "2.7", "whole number"]),
    ({"stages": [[0.0, 1], [0.1, "4"]]}, ["stages[1]", "'4'", "whole number"]),
    ({"stages": [[0.0, 1], [0.1, True]]}, ["stages[1]", "True", "whole number"]),
    ({"stages": [[0.0, 1], [0.1, 4.0]]}, ["stages[1]", "4.0", "not 4.0"]),
    ({"stages": [[0.0, 0], [0.1, 2]]}, ["stages[0]", "got 0", ">= 1"]),
    ({"stages": [[0.0, 3], [0.1, 3]]}, ["stages[1]", "3", "strictly increasing"]),
    ({"stages": [[0.0, 1], [0.1, 10**12]]}, ["stages[1]", str(10**12), "<= 10000000"]),
    ({"stages": [[0.0, 1], [float("nan"), 2]]}, ["stages[1]", "nan", "finite", ">= 0"]),
    ({"stages": [[0.0, 1], [float("inf"), 2]]}, ["stages[1]", "inf", "finite"]),
    ({"stages": [[0.0, 1], [-0.1, 2]]}, ["stages[1]", "-0.1", ">= 0"]),
    ({"stages": [[0.0, 1], [0.1]]}, ["stages[1]", "[lambda, end_step]"]),
    ({"stages": []}, ["stages", "at least 1"]),
    ({"stages": "fast"}, ["stages", "'fast'"]),
    ({"seed": 2**70}, ["seed", str(2**70), "4294967295"]),
    ({"seed": -1}, ["seed", "-1", "4294967295"]),
    ({"seed": 1.5}, ["seed", "1.5", "whole number"]),
    ({"lr": 1e38}, ["lr", "1e+38", "<= 1", "AdamW"]),
    ({"lr": 0}, ["lr", "got 0", "> 0"]),
    ({"lr": 10**400}, ["lr", "must be a finite number > 0 and <= 1"]),
    ({"threshold": 10**400}, ["threshold", "finite"]),
    ({"lr": True}, ["lr", "True", "finite number"]),
    ({"lr": "0.1"}, ["lr", "'0.1'", "finite number"]),
    ({"weight_decay": -1}, ["weight_decay", "-1", ">= 0"]),
    ({"seq_len": 10**30}, ["seq_len", str(10**30), "<="]),
    ({"seq_len": 1}, ["seq_len", "got 1", ">= 2"]),
    ({"batch_size": 10**9}, ["batch_size", str(10**9), "<="]),
    ({"eval_windows": 0}, ["eval_windows", "got 0", ">= 1"]),
    ({"calib_windows": 2.0}, ["calib_windows", "2.0", "whole number"]),
    ({"warmup_steps": -1}, ["warmup_steps", "-1", ">= 0"]),
    ({"checkpoint_every": 10**12}, ["checkpoint_every", str(10**12), "<="]),
    ({"max_steps": 1}, ["max_steps", "got 1", "2 stages"]),
    ({"max_steps": 10**12}, ["max_steps", str(10**12), "<= 10000000"]),
    ({"threshold": float("inf")}, ["threshold", "inf", "finite"]),
    ({"target_sparsity": 1}, ["target_sparsity", "got 1", "< 1"]),
    ({"sweep_thresholds": [0.1, float("nan")]}, ["sweep_thresholds[1]", "nan", "finite"]),
    ({"norm": "l2"}, ["norm", "'l2'", "'mean'"]),
]


@pytest.mark.parametrize(("fields", "expected"), BAD_CONFIGS, ids=lambda v: repr(v)[:40])
def test_bad_config_value_is_refused_naming_field_value_and_range(fields, expected) -> None:
    with pytest.raises(InputError) as err:
        SparsifyConfig.from_dict({**FAST, **fields})
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"stages": [[0.0, 1], [0.1, float("inf")]]}, ["stages[1]", "inf"]),  # was OverflowError
        ({"stages": [[0.0, 1], [0.1, 2.7]]}, ["stages[1]", "2.7"]),  # was truncated to 2
        ({"stages": [[0.0, 1], [0.1, "4"]]}, ["stages[1]", "'4'"]),  # was read as 4
        ({"seed": 2**70}, ["seed", "4294967295"]),  # crashed torch.manual_seed
        ({"lr": 1e38}, ["lr", "AdamW"]),  # NaN at step 1, left an empty --out
    ],
    ids=["inf-end", "fractional-end", "string-end", "huge-seed", "huge-lr"],
)
def test_cli_bad_config_exits_2_and_creates_no_out(
    tmp_path, tiny_model_dir, text_file, fields, expected
) -> None:
    result, out = _sparsify(tmp_path, tiny_model_dir, text_file, config=fields)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert not out.exists()


def test_good_configs_pass() -> None:
    SparsifyConfig().validate()
    for preset in PRESETS.values():
        SparsifyConfig.from_dict(dict(preset))
    edge = SparsifyConfig.from_dict({"seed": 2**32 - 1, "lr": 1, "warmup_steps": 0})
    assert edge.seed == 2**32 - 1 and edge.lr == 1
    big = SparsifyConfig.from_dict({"stages": [[0, 1], [0.5, 10_000_000]]})
    assert big.schedule().ends == (1, 10_000_000)


@pytest.mark.parametrize(
    ("stages", "max_steps"),
    [
        ([[0.0, 1], [0.1, 10_000_000]], 2),  # the first stage rounds to 0 steps
        ([[0.0, 9_999_990], [0.1, 9_999_995], [0.2, 10_000_000]], 3),
        ([[0.0, 1], [0.1, 2], [0.2, 3]], 10_000_000),  # scaled up to the cap
        ([[0.0, 100], [0.05, 120], [0.12, 170], [0.12, 200]], 4),
    ],
)
def test_max_steps_scaling_keeps_every_stage(stages, max_steps) -> None:
    schedule = SparsifyConfig.from_dict({"stages": stages, "max_steps": max_steps}).schedule()
    assert schedule.ends[0] >= 1 and schedule.ends[-1] == max_steps
    assert all(b > a for a, b in zip(schedule.ends, schedule.ends[1:]))
    assert all(isinstance(e, int) for e in schedule.ends)


@pytest.mark.parametrize(
    "stages",
    [[(0, 2.7)], [(0, "4")], [(0, float("inf"))], [(0, True)], [("0.1", 3)]],
)
def test_schedule_refuses_non_integer_ends_instead_of_truncating(stages) -> None:
    with pytest.raises(ValueError, match="stages"):
        ProSparseSchedule.from_stages(stages)


# --- problem 13: devices -------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "xla", "cpu:1", "ipu"])
def test_device_that_cannot_train_is_refused_listing_accepted(device) -> None:
    with pytest.raises(InputError) as err:
        check_device(device)
    assert repr(device) in str(err.value) and "cpu" in str(err.value)


def test_mps_only_where_available(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(InputError, match="'mps'.*not available"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == "mps"


def test_cuda_index_below_device_count(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda") == "cuda"
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match=r"'cuda:2'.*2 CUDA devices.*cuda:0, cuda:1"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA"):
        check_device("cuda:0")


def test_accepted_devices_still_pass() -> None:
    assert check_device("cpu") == "cpu"
    assert check_device(None) in ("cpu", "cuda")
    with pytest.raises(InputError, match="unknown device"):
        check_device("nonsense")


@pytest.mark.parametrize("device", ["meta", "mps"])
def test_cli_device_meta_and_mps_exit_2_and_create_no_out(
    tmp_path, tiny_model_dir, text_file, device, monkeypatch
) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    result, out = _sparsify(tmp_path, tiny_model_dir, text_file, "--device", device)
    assert result.exit_code == 2, result.output
    assert f"device {device!r}" in result.output and "cpu" in result.output
    assert not out.exists()


# --- problem 17: the torchrun environment --------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc'", "torchrun", "unset WORLD_SIZE"]),
        ({"WORLD_SIZE": "0"}, ["WORLD_SIZE='0'", ">= 1"]),
        ({"WORLD_SIZE": "2"}, ["RANK", "not set", "WORLD_SIZE='2'", "torchrun"]),
        ({"WORLD_SIZE": "2", "RANK": "2"}, ["RANK='2'", "0 to 1"]),
        ({"WORLD_SIZE": "2", "RANK": "x"}, ["RANK='x'", "whole number"]),
        ({"WORLD_SIZE": "2", "RANK": "1"}, ["LOCAL_RANK", "not set"]),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, ["LOCAL_RANK='-1'", "0 to 1"]),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, ["MASTER_ADDR", "not set"]),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
            ["MASTER_PORT", "not set"],
        ),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "70000",
            },
            ["MASTER_PORT='70000'", "65535"],
        ),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29500",
                RENDEZVOUS_TIMEOUT_ENV: "soon",
            },
            [f"{RENDEZVOUS_TIMEOUT_ENV}='soon'", "seconds"],
        ),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_bad_torchrun_variable_is_named(clean_env, env, expected) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(InputError) as err:
        init_from_env("cpu")
    assert time.monotonic() - started < 5
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


@pytest.mark.parametrize("rank", ["0", "1"])  # rank 0 hosts the store; rank 1 finds nobody
def test_rendezvous_times_out_naming_the_variables(clean_env, caplog, capfd, rank) -> None:
    port = str(_free_port())
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": port}.items():
        clean_env.setenv(name, value)
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(InputError) as err:
        init_from_env("cpu", timeout=2)
    took = time.monotonic() - started
    assert 1.5 < took < 20, took
    message = str(err.value)
    for part in ("WORLD_SIZE=2", f"127.0.0.1:{port}", "2 s", RENDEZVOUS_TIMEOUT_ENV, "torchrun"):
        assert part in message, (part, message)
    waiting = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waiting and f"2 processes at 127.0.0.1:{port}" in waiting[0]
    assert "Exception raised from" not in capfd.readouterr().err  # no C++ stack dump
    assert not dist.is_initialized()


def test_rendezvous_timeout_from_environment(clean_env) -> None:
    port = str(_free_port())
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**env, "MASTER_PORT": port, RENDEZVOUS_TIMEOUT_ENV: "1.5"}.items():
        clean_env.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"1\.5 s"):
        init_from_env("cpu")
    assert time.monotonic() - started < 20


def test_one_process_without_torchrun(clean_env) -> None:
    ctx = init_from_env("cpu")
    assert (ctx.rank, ctx.world_size) == (0, 1)
    clean_env.setenv("WORLD_SIZE", "1")
    assert init_from_env("cpu").world_size == 1


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
        ({"WORLD_SIZE": "2"}, "RANK"),
    ],
    ids=["world-abc", "world-2-alone"],
)
def test_cli_stale_world_size_exits_2_and_creates_no_out(
    tmp_path, tiny_model_dir, text_file, clean_env, env, expected
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    result, out = _sparsify(tmp_path, tiny_model_dir, text_file)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "torchrun" in result.output
    assert not out.exists()


def test_cli_rendezvous_timeout_exits_2_and_creates_no_out(
    tmp_path, tiny_model_dir, text_file, clean_env
) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {
        **env,
        "MASTER_PORT": str(_free_port()),
        RENDEZVOUS_TIMEOUT_ENV: "2",
    }.items():
        clean_env.setenv(name, value)
    result, out = _sparsify(tmp_path, tiny_model_dir, text_file)
    assert result.exit_code == 2, result.output
    assert "MASTER_ADDR" in result.output and RENDEZVOUS_TIMEOUT_ENV in result.output
    assert not out.exists()


def test_every_config_field_has_one_rule() -> None:
    import dataclasses

    from prosparse_fx.config import FIELD_RULES

    assert set(FIELD_RULES) == {f.name for f in dataclasses.fields(SparsifyConfig)}
