"""Two gloo processes take one training step on a global batch; loss, every gradient and the weights after the
optimizer step equal one process's step on the same batch.

The ranks hold unequal shares (5 and 3 pairs, as after skipping unreadable images) tokenized to unequal
lengths (7 and 12 tokens): only the features, (batch, embed_dim) after pooling, cross between processes.
The single process sees the texts padded to the longest length, which right padding leaves unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipforge.config import DistributedConfig, LossConfig, OptimConfig, TrainConfig
from clipforge.data.samples import Batch
from clipforge.distributed import DistributedContext, all_reduce_sum, init_distributed, wrap
from clipforge.losses import build_loss
from clipforge.model import create_model
from clipforge.train.gradcache import backward_step
from clipforge.train.optim import build_optimizer
from tests.conftest import tiny_config
from tests.distributed.helpers import COLLECTIVE_TIMEOUT_S, spawn

ROWS = (5, 3)  # pairs per rank
LENGTHS = (7, 12)  # each rank's padded text length
VOCAB = 50
GRAD_CLIP = 0.05  # small enough to clip: the clipped norm must be the global one under FSDP too


@dataclass(frozen=True)
class Case:
    loss: str
    strategy: str = "ddp"
    accumulation_steps: int = 1
    chunk_size: int | None = None
    gradient_checkpointing: bool = False

    @property
    def name(self) -> str:
        name = f"{self.loss}-{self.strategy}-acc{self.accumulation_steps}-chunk{self.chunk_size}"
        return name + ("-checkpointed" if self.gradient_checkpointing else "")


CASES = [
    Case("clip"),
    Case("clip", accumulation_steps=2, chunk_size=3),
    Case("siglip"),
    Case("siglip", accumulation_steps=2, chunk_size=3),
    Case("clip", strategy="fsdp", accumulation_steps=2),
    Case("siglip", strategy="fsdp", gradient_checkpointing=True),
    Case("siglip", accumulation_steps=2, gradient_checkpointing=True),
]


def rank_batch(rank: int) -> Batch:
    generator = torch.Generator().manual_seed(100 + rank)
    rows, length = ROWS[rank], LENGTHS[rank]
    images = torch.randn(rows, 3, 32, 32, generator=generator)
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=generator) * mask  # padding id 0
    return Batch(images, input_ids, mask)


def global_batch() -> Batch:
    parts = [rank_batch(rank) for rank in range(len(ROWS))]
    longest = max(LENGTHS)
    return Batch(
        torch.cat([p.images for p in parts]),
        torch.cat([F.pad(p.input_ids, (0, longest - p.input_ids.shape[1])) for p in parts]),
        torch.cat([F.pad(p.attention_mask, (0, longest - p.attention_mask.shape[1])) for p in parts]),
    )


def take_step(case: Case, context: DistributedContext, batch: Batch) -> dict:
    """One training step as the trainer takes it; returns the global loss, full gradients and full weights."""
    torch.manual_seed(0)
    model = create_model(tiny_config(Path("-"), Path("-")).model, loss_kind=case.loss, vocab_size=VOCAB).train()
    train_config = TrainConfig(
        distributed=DistributedConfig(strategy=case.strategy), gradient_checkpointing=case.gradient_checkpointing
    )
    module = wrap.prepare_model(model, train_config, context)
    loss_fn = build_loss(LossConfig(kind=case.loss, chunk_size=case.chunk_size), distributed=context.enabled)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    loss = backward_step(
        module, loss_fn, batch, case.accumulation_steps, contextlib.nullcontext(), None, context.world_size
    )
    wrap.finish_gradients(module)
    grads = {}
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    weights = {name: value.clone() for name, value in wrap.model_state(module).items()}
    return {"loss": all_reduce_sum(loss.clone()), "grads": grads, "weights": weights}


def _worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    try:
        context = init_distributed(torch.device("cpu"))
        results = {case.name: take_step(case, context, rank_batch(rank)) for case in CASES}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("two_processes")
    spawn(_worker, len(ROWS), out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(len(ROWS))]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_two_process_step_equals_one_process_step(case: Case, two_process_results: list[dict]) -> None:
    reference = take_step(case, DistributedContext(), global_batch())
    assert len(reference["grads"]) > 20
    for rank, results in enumerate(two_process_results):
        result = results[case.name]
        assert torch.allclose(result["loss"], reference["loss"], atol=1e-5), (rank, result["loss"], reference["loss"])
        assert result["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5), (rank, name)
    weights = two_process_results[0][case.name]["weights"]  # gathered to rank 0: full tensors, one process's names
    assert weights.keys() == reference["weights"].keys()
    for name, value in reference["weights"].items():
        assert torch.allclose(weights[name], value, atol=1e-5), name
    assert two_process_results[1][case.name]["weights"] == {} or case.strategy == "ddp"
