"""Data parallel on CPU (gloo, 2 processes): the library loop and `prosparse-fx sparsify` under
torchrun end with the weights of one process trained on the same global batches."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prosparse_fx import ActivationRegularizer, ProSparseSchedule, relufy_
from prosparse_fx.training.distributed import DistContext, ShardedBatches
from prosparse_fx.training.loop import batches_forever, train
from tests.models import tiny

STEPS = 3
SCHEDULE = [(0.0, 1), (0.5, 2), (2.0, 3)]


def _windows() -> torch.Tensor:
    return torch.randint(3, 128, (8, 12), generator=torch.Generator().manual_seed(11))


def _run(ctx: DistContext) -> dict[str, torch.Tensor]:
    """Train; the weights, plus each step's logged LM loss, L1 and sparsity as ``log.*``."""
    model = tiny("llama")
    relufy_(model, "relu")
    schedule = ProSparseSchedule.from_stages(SCHEDULE)
    reg = ActivationRegularizer(model, schedule)
    batches = batches_forever(_windows(), 4, seed=0)
    if ctx.world_size > 1:
        batches = ShardedBatches(batches, ctx)
    wrapped = ctx.wrap(model)  # before the optimizer: FSDP2 replaces the parameters
    logs = train(
        wrapped,
        reg,
        batches,
        start_step=0,
        end_step=STEPS,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        stage_of=schedule.stage,
        ctx=ctx,
    )
    state = model.state_dict()
    if ctx.sharding == "fsdp" and ctx.world_size > 1:
        assert any(hasattr(v, "full_tensor") for v in state.values())  # really sharded
    result = {
        k: getattr(v, "full_tensor", lambda v=v: v)().detach().clone() for k, v in state.items()
    }
    for key in ("lm_loss", "l1", "sparsity"):
        result[f"log.{key}"] = torch.tensor([getattr(log, key) for log in logs])
    return result


def _worker(rank: int, world: int, init_file: str, out: str, sharding: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _run(DistContext(rank=rank, world_size=world, sharding=sharding))
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_data_parallel_loop_matches_one_process(tmp_path, sharding) -> None:
    """Weights and the logged global-batch loss, L1 and sparsity of 2 processes equal those of
    one process on the same global batches, on both ranks."""
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out, sharding), nprocs=2, join=True)
    single = _run(DistContext())
    for rank in (0, 1):
        state = torch.load(f"{out}.{rank}", weights_only=True)
        assert state.keys() == single.keys()
        for name, value in single.items():
            assert (state[name] - value).abs().max() < 1e-5, (rank, name)
    # the steps really moved the weights
    assert (
        single["model.layers.0.mlp.gate_proj.weight"]
        - tiny("llama").state_dict()["model.layers.0.mlp.gate_proj.weight"]
    ).abs().max() > 1e-3


def test_world_size_must_divide_the_batch() -> None:
    from prosparse_fx.errors import InputError

    with pytest.raises(InputError, match="sharding must be one of"):
        DistContext(sharding="zero3")

    with pytest.raises(InputError, match="does not split over 3 processes"):
        DistContext(rank=0, world_size=3).check_batch(4)


def _sparsify_case(tmp_path, model_dir, **config) -> tuple[list[str], list[str], Path]:
    """A small sparsify job: the ``prosparse-fx sparsify`` arguments (model, data, config), the
    torchrun launcher for 2 processes, and the folder of the same job run by one process."""
    from prosparse_fx.data import load_documents

    data = tmp_path / "wiki.jsonl"
    data.write_text("\n".join(json.dumps({"text": d[:3000]}) for d in load_documents()[:30]))
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(
            {
                "eval_windows": 2,
                "calib_windows": 2,
                "sweep_thresholds": [0.0],
                "seq_len": 32,
                "batch_size": 4,
                "stages": [[0.0, 2], [0.5, 4]],
                "precision": "fp32",
                **config,
            }
        )
    )
    exe = shutil.which("prosparse-fx", path=str(Path(sys.executable).parent))
    common = [exe, "sparsify", "--model", str(model_dir), "--data", str(data)]
    common += ["--config", str(config_file)]
    one = tmp_path / "one"
    subprocess.run([*common, "--out", str(one)], check=True, capture_output=True, timeout=600)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2", "--no-python"]
    return common, launcher, one


def _assert_same_result(one: Path, two: Path) -> tuple[dict, dict]:
    """Weights within 1e-5, final sparsity within 1e-6, and the logged loss curve (the global
    batch's LM loss, L1 and sparsity at every step) within 1e-5; returns both reports."""
    from safetensors.torch import load_file

    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    ra = json.loads((one / "report.json").read_text())
    rb = json.loads((two / "report.json").read_text())
    assert rb["sparsity"] == pytest.approx(ra["sparsity"], abs=1e-6)
    assert [h["step"] for h in rb["history"]] == [h["step"] for h in ra["history"]]
    for ha, hb in zip(ra["history"], rb["history"]):
        for key in ("lm_loss", "l1", "sparsity"):
            assert hb[key] == pytest.approx(ha[key], abs=1e-5), (ha["step"], key)
    return ra, rb


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_sparsify_under_torchrun_matches_one_process(tmp_path, tiny_model_dir, sharding) -> None:
    common, launcher, one = _sparsify_case(tmp_path, tiny_model_dir)
    two = tmp_path / "two"
    run = subprocess.run(
        [*launcher, *common, "--out", str(two), "--sharding", sharding],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    _assert_same_result(one, two)


# Imported by every Python process started with this folder on PYTHONPATH: in torchrun's rank 0
# it sends SIGTERM to its own process during step 3, as a scheduler's preemption would.
_SIGTERM_RANK0_AT_STEP_3 = """
import os
if os.environ.get("RANK") == "0":
    import prosparse_fx.training.trainer as trainer
    from tests.preempt import sigterm_at_step
    trainer.train = sigterm_at_step(trainer.train, 3)
"""


@pytest.mark.slow
def test_sigterm_under_torchrun_then_sharded_resume_matches_one_process(
    tmp_path, tiny_model_dir
) -> None:
    """FSDP2 under torchrun, SIGTERM to rank 0 alone during step 3 of 4 (no interval
    checkpoint due): the ranks agree to stop after step 3, write one checkpoint and exit 143;
    `--resume` under torchrun with FSDP2 then ends with one process's weights and sparsity."""
    common, launcher, one = _sparsify_case(tmp_path, tiny_model_dir, checkpoint_every=1000)

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGTERM_RANK0_AT_STEP_3)
    root = str(Path(__file__).resolve().parent.parent)  # for tests.preempt
    path = os.pathsep.join(filter(None, [str(hook), root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    two = tmp_path / "two"
    run = subprocess.run(
        [*launcher, *common, "--out", str(two), "--sharding", "fsdp"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "stopped by SIGTERM after step 3" in output, output[-3000:]
    # torchrun's failure summary lists SIGTERM's exit code (both ranks, or only the first to
    # exit when torchrun stops the other itself; the checkpoint is written before either exits)
    assert re.search(r"exitcode\s+:\s+143", output), output[-3000:]
    assert not (two / "report.json").exists()
    from prosparse_fx.run_folder import RunFolder
    from prosparse_fx.training.checkpoint import load_state

    assert load_state(RunFolder(two).latest_checkpoint())["step"] == 3

    resumed = subprocess.run(
        [*launcher, common[0], "sparsify", "--resume", str(two), "--sharding", "fsdp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ra, rb = _assert_same_result(one, two)
    assert rb["resumed_at_step"] == 3
    assert len(rb["history"]) == 4
