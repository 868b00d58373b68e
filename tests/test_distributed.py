"""Data parallel on CPU (gloo, 2 processes): the library loop and `prosparse-fx sparsify` under
torchrun end with the weights of one process trained on the same global batches."""

import json
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
    model = tiny("llama")
    relufy_(model, "relu")
    schedule = ProSparseSchedule.from_stages(SCHEDULE)
    reg = ActivationRegularizer(model, schedule)
    batches = batches_forever(_windows(), 4, seed=0)
    if ctx.world_size > 1:
        batches = ShardedBatches(batches, ctx)
    wrapped = ctx.wrap(model)  # before the optimizer: FSDP2 replaces the parameters
    train(
        wrapped,
        reg,
        batches,
        start_step=0,
        end_step=STEPS,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        stage_of=schedule.stage,
    )
    state = model.state_dict()
    if ctx.sharding == "fsdp" and ctx.world_size > 1:
        assert any(hasattr(v, "full_tensor") for v in state.values())  # really sharded
    return {
        k: getattr(v, "full_tensor", lambda v=v: v)().detach().clone() for k, v in state.items()
    }


def _worker(rank: int, world: int, init_file: str, out: str, sharding: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _run(DistContext(rank=rank, world_size=world, sharding=sharding))
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_data_parallel_loop_matches_one_process(tmp_path, sharding) -> None:
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


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_sparsify_under_torchrun_matches_one_process(tmp_path, tiny_model_dir, sharding) -> None:
    from prosparse_fx.data import load_documents

    data = tmp_path / "wiki.jsonl"
    data.write_text("\n".join(json.dumps({"text": d[:3000]}) for d in load_documents()[:30]))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "eval_windows": 2,
                "calib_windows": 2,
                "sweep_thresholds": [0.0],
                "seq_len": 32,
                "batch_size": 4,
                "stages": [[0.0, 2], [0.5, 4]],
                "precision": "fp32",
            }
        )
    )
    exe = shutil.which("prosparse-fx", path=str(Path(sys.executable).parent))
    common = ["sparsify", "--model", str(tiny_model_dir), "--data", str(data)]
    common += ["--config", str(config)]
    one = tmp_path / "one"
    subprocess.run([exe, *common, "--out", str(one)], check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc-per-node", "2", "--no-python", exe]
    run = subprocess.run(
        [*launcher, *common, "--out", str(two), "--sharding", sharding],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    ra = json.loads((one / "report.json").read_text())
    rb = json.loads((two / "report.json").read_text())
    assert rb["sparsity"] == pytest.approx(ra["sparsity"], abs=1e-6)
