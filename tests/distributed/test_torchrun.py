"""`torchrun --nproc-per-node=2 -m clipforge train`: rank 0 writes one set of checkpoints and logs; the
checkpoint resumes on 2 processes (here under FSDP2) and on 1, and both continue exactly where an
uninterrupted 2-process run goes. A retrieval evaluation runs every 3 steps (rank 0 alone under DDP, every
rank under FSDP2, which gathers the weights for it) and keeps best.pt.

Why 1 process can match 2 exactly: the sampler deals each epoch's order to the ranks in turn, so the global
batch of every step is the same set of samples whatever the number of processes, the loss does not depend on
the order within a batch, and the tiny model has no dropout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import read_checkpoint
from clipforge.config import save_config
from clipforge.distributed import wrap
from clipforge.interop.load import load_checkpoint
from clipforge.model import create_model
from clipforge.train.optim import build_optimizer
from clipforge.train.run_log import read_metrics
from tests.conftest import tiny_config, write_shapes_manifest
from tests.distributed.helpers import launch

RUN = {"steps": 6, "batch_size": 8, "checkpoint_every": 3, "keep_checkpoints": 2}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-process run: 6 steps, checkpoints at steps 3 and 6; returns the work folder."""
    folder = tmp_path_factory.mktemp("torchrun")
    manifest = write_shapes_manifest(folder / "shapes")
    evaluation = {
        "every": 3,
        "best_metric": "shapes/image_retrieval_recall@5",
        "tasks": [{"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}}],
    }
    config = tiny_config(manifest, folder / "run", train=RUN, logging={"log_every": 3}, eval=evaluation)
    save_config(config, folder / "tiny.yaml")
    output = launch(["train", "tiny.yaml"], processes=2, cwd=folder)
    assert output.count("trained 6 steps") == 1  # rank 0 alone prints the summary
    return folder


def assert_same_weights(first: Path, second: Path, atol: float) -> None:
    expected, actual = read_checkpoint(first).weights, read_checkpoint(second).weights
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value, actual[name], atol=atol), name


def test_rank_zero_writes_the_checkpoints_and_logs(two_process_run: Path) -> None:
    run = two_process_run / "run"
    files = sorted(p.name for p in run.iterdir())
    # (.clipforge.lock: the folder's writer lock, which rank 0 holds while the run writes it)
    assert files == [".clipforge.lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl", "step_3.pt", "step_6.pt"]
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], "loss" in r) for r in records] == [(3, True), (3, False), (6, True), (6, False)]  # once
    at_step_3 = read_checkpoint(run / "step_3.pt")
    assert (at_step_3.step, at_step_3.training.samples_seen, at_step_3.training.world_size) == (3, 24, 2)
    assert load_checkpoint(run / "last.pt").step == 6  # the full weights load in one process


def test_resume_on_two_processes_with_fsdp_continues_exactly(two_process_run: Path) -> None:
    output = launch(
        [
            "train",
            "tiny.yaml",
            "train.output_dir=resumed_fsdp",
            "train.distributed.strategy=fsdp",
            "--resume",
            "run/step_3.pt",
        ],
        processes=2,
        cwd=two_process_run,
    )
    assert "resumed from run/step_3.pt at step 3" in output
    metric = "shapes/image_retrieval_recall@5"
    evaluated = read_metrics(two_process_run / "resumed_fsdp" / "metrics.jsonl")[-1]
    assert (
        evaluated["step"] == 6
        and evaluated[metric] == read_metrics(two_process_run / "run" / "metrics.jsonl")[-1][metric]
    )
    resumed = two_process_run / "resumed_fsdp" / "last.pt"
    assert read_checkpoint(resumed).step == 6
    assert_same_weights(two_process_run / "run" / "last.pt", resumed, atol=1e-6)
    assert load_checkpoint(resumed).step == 6  # the gathered FSDP2 checkpoint loads in one process

    # its optimizer state is keyed by parameter name; it loads into one process's optimizer as the DDP one does
    def loaded_optimizer(checkpoint: Path) -> dict:
        state = read_checkpoint(checkpoint)
        loaded = load_checkpoint(checkpoint)
        model = create_model(loaded.config.model, vocab_size=loaded.tokenizer.vocab_size)
        optimizer = build_optimizer(model, loaded.config.optim, torch.device("cpu"), loaded.config.model)
        wrap.load_optimizer_state(model, optimizer, state.training.optimizer)
        return optimizer.state_dict()

    from_fsdp, from_ddp = loaded_optimizer(resumed), loaded_optimizer(two_process_run / "run" / "last.pt")
    assert from_fsdp["state"].keys() == from_ddp["state"].keys()
    for number, values in from_ddp["state"].items():
        for key, value in values.items():
            assert torch.allclose(from_fsdp["state"][number][key], value, atol=1e-6), (number, key)


def test_resume_on_one_process_continues(two_process_run: Path) -> None:
    launch(["train", "tiny.yaml", "train.output_dir=resumed_one", "--resume", "run/step_3.pt"], 1, two_process_run)
    resumed = two_process_run / "resumed_one"
    assert [record["step"] for record in read_metrics(resumed / "metrics.jsonl")] == [6, 6]  # training, evaluation
    assert read_checkpoint(resumed / "last.pt").step == 6
    assert_same_weights(two_process_run / "run" / "last.pt", resumed / "last.pt", atol=1e-5)
