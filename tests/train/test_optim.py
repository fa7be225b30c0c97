import math

import pytest
import torch
from torch import nn

from clipforge.config import OptimConfig, ScheduleConfig
from clipforge.train.optim import build_optimizer, lr_multiplier, parameter_groups


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.position = nn.Parameter(torch.zeros(3, 4))
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.log_logit_scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_only_on_matrix_weights_and_frozen_excluded() -> None:
    model = Toy()
    decay, no_decay = parameter_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.linear.weight), id(model.conv.weight)}
    expected = {
        model.embedding.weight,
        model.position,
        model.linear.bias,
        model.norm.weight,
        model.norm.bias,
        model.conv.bias,
        model.log_logit_scale,
    }
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in expected}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    optimizer = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.frozen.weight) not in in_optimizer and id(model.frozen.bias) not in in_optimizer


def test_warmup_then_cosine() -> None:
    config = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_multiplier(s, 14, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, 14, config) == pytest.approx(1.0)
    assert lr_multiplier(9, 14, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(14, 14, config) == pytest.approx(0.1)
    assert lr_multiplier(50, 10, ScheduleConfig(kind="constant", warmup_steps=2)) == 1.0


def test_the_cpu_optimizer_is_the_fused_kernel_and_steps_like_the_reference_loop() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    reference = nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(
        parameter_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False
    )  # torch's per-tensor AdamW: the independent reference
    for _ in range(5):
        for net, optimizer in ((model, fused), (reference, loop)):
            optimizer.zero_grad()
            net(torch.ones(3, 8)).square().sum().backward()
            optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
