"""train.ema under several processes: sharded like the parameters under FSDP2 (each rank holds its shard), gathered
whole into checkpoints, and a 2-process DDP run's average is continued exactly by an FSDP2 resume."""

from __future__ import annotations

import datetime
import os
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clipforge.checkpoint import read_checkpoint
from clipforge.config import DistributedConfig, EMAConfig, TrainConfig, save_config
from clipforge.distributed import init_distributed, wrap
from clipforge.model import create_model
from clipforge.train.ema import WeightAverage
from tests.conftest import tiny_config, write_shapes_manifest
from tests.distributed.helpers import launch, spawn

CONFIG = EMAConfig(decay=0.7, every=1, start_step=1)
STEPS = 4


def shifted(name: str, step: int, shape: torch.Size) -> torch.Tensor:
    """The deterministic change every rank makes to parameter ``name`` at ``step`` (the same full tensor)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))  # not hash(): salted per process
    return torch.randn(shape, generator=generator)


def reference(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The average of the same updates in one process, with full tensors."""
    average = WeightAverage(model, CONFIG)
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.add_(shifted(name, step, parameter.shape))
        average.update(step)
    return average.state_dict()


def _worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        context = init_distributed(torch.device("cpu"))
        torch.manual_seed(0)
        model = create_model(tiny_config(Path("-"), Path("-")).model, vocab_size=50)
        module = wrap.prepare_model(model, TrainConfig(distributed=DistributedConfig(strategy="fsdp")), context)
        average = WeightAverage(wrap.unwrap(module), CONFIG)
        sharded = {}
        for name, value, parameter in zip(average.names, average.averages, average.parameters, strict=True):
            if hasattr(parameter, "placements"):
                sharded[name] = (
                    tuple(value.placements) == tuple(parameter.placements),
                    value.to_local().shape == parameter.to_local().shape,
                    value.to_local().numel() < value.numel(),
                )
        for step in range(1, STEPS + 1):
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    change = shifted(name, step, parameter.shape)
                    if hasattr(parameter, "placements"):  # each rank adds its shard of the same full change
                        from torch.distributed.tensor import distribute_tensor

                        change = distribute_tensor(
                            change, parameter.device_mesh, parameter.placements, src_data_rank=None
                        )
                    parameter.add_(change)
            average.update(step)
        gathered = average.state_dict()
        # a checkpoint's average loads back into the shards it came from
        replacement = {name: torch.full_like(value, 3.0) for name, value in gathered.items()}
        average.load_state_dict(replacement)
        reloaded = average.state_dict()
        torch.save({"sharded": sharded, "gathered": gathered, "reloaded": reloaded}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_under_fsdp2_the_average_is_sharded_like_the_parameters(tmp_path: Path) -> None:
    spawn(_worker, 2, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.manual_seed(0)
    expected = reference(create_model(tiny_config(Path("-"), Path("-")).model, vocab_size=50))
    for rank, result in enumerate(results):
        assert len(result["sharded"]) > 20, "the blocks, towers and heads are sharded"
        for name, (same_placement, same_shard, _) in result["sharded"].items():
            assert same_placement and same_shard, (rank, name)
        assert sum(a_part for _, _, a_part in result["sharded"].values()) > 20  # each rank holds a part only
        assert result["gathered"].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(result["gathered"][name], value, rtol=1e-6, atol=1e-6, msg=name)
            assert torch.equal(result["reloaded"][name], torch.full_like(value, 3.0)), name


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ema_torchrun")
    manifest = write_shapes_manifest(folder / "shapes")
    train = {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "keep_checkpoints": 2}
    train["ema"] = {"decay": 0.8, "start_step": 1}
    save_config(tiny_config(manifest, folder / "run", train=train, logging={"log_every": 3}), folder / "tiny.yaml")
    launch(["train", "tiny.yaml"], processes=2, cwd=folder)
    return folder


def test_an_fsdp2_resume_continues_a_ddp_runs_average(ddp_run: Path) -> None:
    arguments = ["train", "tiny.yaml", "train.output_dir=fsdp", "train.distributed.strategy=fsdp"]
    launch([*arguments, "--resume", "run/step_3.pt"], processes=2, cwd=ddp_run)
    uninterrupted, resumed = read_checkpoint(ddp_run / "run" / "last.pt"), read_checkpoint(ddp_run / "fsdp" / "last.pt")
    assert resumed.step == 6 and uninterrupted.ema.keys() == resumed.ema.keys()
    for name, value in uninterrupted.ema.items():
        assert torch.allclose(resumed.ema[name], value, atol=1e-6), name
    assert any(not torch.equal(resumed.ema[k], resumed.weights[k]) for k in resumed.ema)
