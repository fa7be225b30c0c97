"""The run's changing state lives in one RunState that the checkpoint carries; the loop is small named steps."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import clipforge.train.checkpoints
import clipforge.train.gradcache
import clipforge.train.loop
import clipforge.train.preflight
import clipforge.train.resume
import clipforge.train.run_dir
import clipforge.train.setup
import clipforge.train.state
from clipforge.checkpoint import TrainingState, read_checkpoint
from clipforge.train.loop import train
from clipforge.train.state import LogWindow, RunState
from tests.conftest import tiny_config

MODULES = [
    clipforge.train.loop,
    clipforge.train.setup,
    clipforge.train.checkpoints,
    clipforge.train.gradcache,
    clipforge.train.state,
    clipforge.train.resume,
    clipforge.train.run_dir,
    clipforge.train.preflight,
]
LONGEST_FUNCTION = 60


def test_run_state_round_trips_through_its_checkpoint_keys() -> None:
    state = RunState(step=7, samples_seen=112, data_streams=2, skipped_images=3, empty_batches=4, lr=0.1)
    restored = RunState()
    restored.load(state.step, TrainingState(optimizer={}, scheduler={}, rng={}, **state.state_dict()))
    expected = {"samples_seen": 112, "data_streams": 2, "skipped_images": 3}
    assert restored.step == 7 and restored.state_dict() == state.state_dict() == expected
    assert restored.empty_batches == 0, "a resumed run starts with no empty batches behind it"
    older = RunState(data_streams=2)
    # a checkpoint from before the shard layout and the skipped count were saved
    older.load(1, TrainingState(optimizer={}, scheduler={}, rng={}, samples_seen=16))
    assert (older.data_streams, older.skipped_images) == (2, 0)


def test_log_window_sums_on_the_device_and_restarts() -> None:
    window = LogWindow.on(torch.device("cpu"))
    window.add(torch.tensor(2.0), torch.tensor(0.5), 16)
    window.add(torch.tensor(4.0), torch.tensor(1.5), 14)
    assert (window.loss_sum.item(), window.grad_norm_sum.item(), window.steps, window.samples) == (6.0, 2.0, 2, 30)
    started = window.started
    window.reset()
    assert (window.loss_sum.item(), window.grad_norm_sum.item(), window.steps, window.samples) == (0.0, 0.0, 0, 0)
    assert window.started >= started


def test_every_checkpoint_carries_the_run_state(shapes_manifest: Path, tmp_path: Path) -> None:
    result = train(tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 2, "batch_size": 8}))
    saved = read_checkpoint(result.checkpoint)
    assert {"step": saved.step, **{key: getattr(saved.training, key) for key in RunState().state_dict()}} == {
        "step": 2,
        "samples_seen": 16,
        "data_streams": 1,
        "skipped_images": 0,
    }
    assert result.is_main and result.step == 2


@pytest.mark.parametrize("module", MODULES, ids=lambda module: module.__name__)
def test_the_training_code_is_small_functions_without_closures(module) -> None:
    tree = ast.parse(inspect.getsource(module))
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    lengths = {f.name: f.end_lineno - f.lineno + 1 for f in functions}
    assert max(lengths.values()) <= LONGEST_FUNCTION, lengths
    if module is clipforge.train.loop:
        for function in functions:
            inner = [n.name for n in ast.walk(function) if n is not function and isinstance(n, ast.FunctionDef)]
            assert not inner, f"{function.name} defines {inner}: state that changes belongs in RunState"
