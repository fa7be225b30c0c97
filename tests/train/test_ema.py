"""train.ema: the moving average of the weights follows its rule, is kept in checkpoints, resumes bit for bit, and
is what ``--weights ema`` evaluates, embeds and exports; bad settings and checkpoints without one are clear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import ConfigError, EMAConfig
from clipforge.interop.load import from_pretrained
from clipforge.train.ema import WeightAverage
from clipforge.train.loop import train
from tests.conftest import tiny_config

EMA = {"decay": 0.8, "every": 2, "start_step": 3}


def reference_average(history: list[torch.Tensor], config: EMAConfig) -> torch.Tensor:
    """The rule of train.ema written plainly: history[0] holds the weights the run starts from, history[s] those
    after step s."""
    average = history[0].clone()
    for step, weights in enumerate(history[1:], start=1):
        if step <= config.start_step:
            average = weights.clone()
        elif (step - config.start_step) % config.every == 0:
            average = config.decay * average + (1 - config.decay) * weights
    return average


@settings(max_examples=30, deadline=None)
@given(
    decay=st.floats(0.0, 0.999),
    every=st.integers(1, 4),
    start_step=st.integers(0, 6),
    steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_the_average_follows_its_rule(decay: float, every: int, start_step: int, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)  # a frozen parameter is not averaged
    config = EMAConfig(decay=decay, every=every, start_step=start_step)
    average = WeightAverage(layer, config)
    history = [layer.weight.detach().clone()]
    for step in range(1, steps + 1):
        with torch.no_grad():
            layer.weight.add_(torch.randn_like(layer.weight))
        history.append(layer.weight.detach().clone())
        average.update(step)
    state = average.state_dict()
    assert list(state) == ["weight"]
    torch.testing.assert_close(state["weight"], reference_average(history, config), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_continues_the_average_bit_for_bit(shapes_manifest: Path, tmp_path: Path) -> None:
    common = {"steps": 10, "batch_size": 10, "checkpoint_every": 5, "keep_checkpoints": 3, "ema": EMA}
    full = train(tiny_config(shapes_manifest, tmp_path / "run", train=common))
    uninterrupted = read_checkpoint(full.checkpoint)
    at_step_5 = read_checkpoint(tmp_path / "run" / "step_5.pt")
    assert at_step_5.ema is not None and uninterrupted.ema.keys() == at_step_5.ema.keys()
    # the average covers what trains, and differs from the weights once it has started averaging
    trained = {name for name, value in uninterrupted.ema.items()}
    assert "log_logit_scale" in trained and "image_head.proj.weight" in trained
    assert any(not torch.equal(uninterrupted.ema[k], uninterrupted.weights[k]) for k in trained)

    resumed = train(
        tiny_config(shapes_manifest, tmp_path / "resumed", train=common), resume=tmp_path / "run" / "step_5.pt"
    )
    continued = read_checkpoint(resumed.checkpoint)
    assert continued.step == 10
    for key, value in uninterrupted.ema.items():
        assert torch.equal(value, continued.ema[key]), key
    for key, value in uninterrupted.weights.items():
        assert torch.equal(value, continued.weights[key]), key


def test_a_run_without_ema_keeps_none_and_resuming_with_it_starts_from_the_weights(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    plain = train(tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 4, "checkpoint_every": 4}))
    assert read_checkpoint(plain.checkpoint).ema is None
    resumed = train(
        tiny_config(shapes_manifest, tmp_path / "on", train={"steps": 5, "ema": {"decay": 0.5}}),
        resume=plain.checkpoint,
    )
    checkpoint = read_checkpoint(resumed.checkpoint)
    before = read_checkpoint(plain.checkpoint).weights
    key = "image_head.proj.weight"
    # step 5: 0.5 * (the weights at step 4) + 0.5 * (the weights at step 5)
    torch.testing.assert_close(checkpoint.ema[key], 0.5 * before[key] + 0.5 * checkpoint.weights[key])


def test_weights_ema_is_what_every_command_loads(shapes_manifest: Path, tmp_path: Path, capsys) -> None:
    run = train(tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 6, "checkpoint_every": 6, "ema": EMA}))
    checkpoint = read_checkpoint(run.checkpoint)
    averaged = from_pretrained(run.checkpoint, weights="ema").model.state_dict()
    raw = from_pretrained(run.checkpoint).model.state_dict()
    for key, value in checkpoint.ema.items():
        assert torch.equal(averaged[key], value) and torch.equal(raw[key], checkpoint.weights[key])
    assert any(not torch.equal(averaged[key], raw[key]) for key in checkpoint.ema)

    data = ["kind=manifest", f"path={shapes_manifest}"]
    results = {}
    for weights in ("raw", "ema"):
        out = tmp_path / f"{weights}.json"
        code = main(
            ["eval", "--checkpoint", str(run.checkpoint), "--weights", weights, "--task", "retrieval", "--data", *data]
            + ["--out", str(out)]
        )
        assert code == 0
        results[weights] = json.loads(out.read_text())["metrics"]
    assert results["raw"] != results["ema"]  # another model was evaluated
    capsys.readouterr()


def test_weights_ema_without_an_average_is_one_clear_error(
    tiny_checkpoint: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "emb"
    code = main(
        ["embed", "--checkpoint", str(checkpoint), "--weights", "ema", "--images", str(images), "--out", str(out)]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "holds no weight average" in error and "train.ema" in error and "Traceback" not in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("ema", "message"),
    [
        ({"decay": 1.0}, "train.ema.decay=1.0 must lie in [0, 1)"),
        ({"decay": 0.9, "every": 0}, "train.ema.every=0 must be >= 1"),
        ({"decay": 0.9, "start_step": -1}, "train.ema.start_step=-1 must be >= 0"),
    ],
)
def test_bad_ema_settings_are_refused(shapes_manifest: Path, tmp_path: Path, ema: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        tiny_config(shapes_manifest, tmp_path / "run", train={"ema": ema})
