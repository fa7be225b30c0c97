"""LoRA under several processes: one training step of a model with adapters, its blocks sharded by FSDP2 (frozen
weights and trainable adapters in one unit), gives every process the gradients and weights one process computes
on the whole batch; only the adapters and heads move."""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clipforge.config import DistributedConfig, LoraConfig, LossConfig, OptimConfig, TrainConfig
from clipforge.distributed import DistributedContext, all_reduce_sum, init_distributed, wrap
from clipforge.losses import build_loss
from clipforge.model.factory import build_model
from clipforge.train.gradcache import backward_step
from clipforge.train.optim import build_optimizer
from tests.conftest import tiny_config
from tests.distributed.helpers import COLLECTIVE_TIMEOUT_S, spawn
from tests.distributed.test_exact_step import VOCAB, global_batch, rank_batch

pytest.importorskip("peft")


class _Vocabulary:
    vocab_size, pad_token_id = VOCAB, 0


def take_step(context: DistributedContext, batch, strategy: str) -> dict:
    config = tiny_config(Path("-"), Path("-"))
    config.model.image.lora = LoraConfig(rank=2, alpha=4.0)
    config.model.text.lora = LoraConfig(rank=2, alpha=4.0, targets=["attention"])
    torch.manual_seed(0)
    model = build_model(config, _Vocabulary()).train()
    with torch.no_grad():  # adapters that already do something, so their gradients reach everything
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0, 0.1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    module = wrap.prepare_model(model, TrainConfig(distributed=DistributedConfig(strategy=strategy)), context)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), torch.device("cpu"), config.model)
    loss_fn = build_loss(LossConfig(), distributed=context.enabled)
    loss = backward_step(module, loss_fn, batch, 1, contextlib.nullcontext(), None, context.world_size)
    wrap.finish_gradients(module)
    optimizer.step()
    return {"loss": all_reduce_sum(loss.clone()), "weights": wrap.model_state(module), "before": before}


def _worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        result = take_step(init_distributed(torch.device("cpu")), rank_batch(rank), "fsdp")
        torch.save({"loss": result["loss"], "weights": result["weights"]}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_an_fsdp2_step_with_adapters_equals_one_process(tmp_path: Path) -> None:
    spawn(_worker, 2, tmp_path)
    reference = take_step(DistributedContext(), global_batch(), "ddp")
    gathered = torch.load(tmp_path / "rank0.pt")
    assert torch.allclose(gathered["loss"], reference["loss"], atol=1e-5)
    assert gathered["weights"].keys() == reference["weights"].keys()
    moved = []
    for name, value in reference["weights"].items():
        assert torch.allclose(gathered["weights"][name], value, atol=1e-5), name
        if not torch.equal(value, reference["before"][name]):
            moved.append(name)
    towers = [name for name in moved if name.startswith(("image_tower", "text_tower"))]
    assert towers and all(".lora_" in name for name in towers)  # the towers' own weights stayed frozen
