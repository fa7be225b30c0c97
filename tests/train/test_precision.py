"""bf16 mixed precision: the towers compute in bf16, the weights, gradients, loss and logit scale stay float32."""

from __future__ import annotations

import pytest
import torch

from clipforge.losses import build_loss
from clipforge.runtime import autocast_context
from clipforge.train.gradcache import backward_step
from tests.train.test_gradcache import random_batch, tiny_model


@pytest.mark.parametrize(("loss_kind", "accumulation_steps"), [("clip", 1), ("siglip", 2)])
def test_bf16_autocast_step_keeps_float32_master_weights_and_loss(loss_kind: str, accumulation_steps: int) -> None:
    config, model = tiny_model(loss_kind)
    tower_outputs = []
    hook = model.image_tower.transformer.blocks[0].mlp.register_forward_hook(
        lambda module, args, output: tower_outputs.append(output.dtype)
    )
    autocast = autocast_context(torch.device("cpu"), "bf16")
    loss = backward_step(model, build_loss(config.loss), random_batch(8), accumulation_steps, autocast, None)
    hook.remove()
    assert tower_outputs and set(tower_outputs) == {torch.bfloat16}  # the matmuls ran in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
    assert model.log_logit_scale.grad.abs() > 0
