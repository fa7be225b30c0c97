"""A training run refuses what would go nowhere or lose something, and says what a resume changes.

Unreadable data (a: at the start, and in the loop), an output folder that holds a run (b), stale temporaries of
a killed checkpoint write (c), resume surprises (d), numbers the config cannot hold (e), the learning rate each
record logs and the gradient norm beside it (f), the torch.compile note (g), one summary under torchrun (h).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import TrainConfig, load_config, recipe_names, save_config
from clipforge.data.manifest import ManifestSource
from clipforge.train import loop
from clipforge.train.loop import COMPILE_NOTE, TrainResult, train
from clipforge.train.run_log import read_metrics
from tests.conftest import tiny_config
from tests.contract.harness import deadline  # a run that spins on unreadable data fails, not hangs

TINY_RUN = {"steps": 2, "batch_size": 8, "checkpoint_every": 2}


def config_file(tmp_path: Path, manifest: Path, output_dir: Path, **sections) -> str:
    path = tmp_path / f"{output_dir.name}.yaml"
    save_config(tiny_config(manifest, output_dir, **sections), path)
    return str(path)


def remove_images(manifest: Path, keep: int = 0) -> None:
    """Delete every image of the manifest but the first ``keep`` (in the source's index order)."""
    source = ManifestSource(manifest)
    for index in range(keep, len(source)):
        (manifest.parent / source.describe(index)).unlink()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# a. unreadable data
# ----------------------------------------------------------------------------------------------
def test_data_without_a_readable_image_is_refused_before_anything_is_built(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    remove_images(shapes_manifest)
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run")
    with deadline(120):
        assert main(["train", config]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge train: error: ")
    assert f"data.kind='manifest', data.path='{shapes_manifest}'" in error
    assert "none of the first 24 images could be read" in error and "image file is missing" in error
    assert "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_a_loop_that_meets_only_empty_batches_stops_with_a_data_error(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # one readable image of 24: the start-up check passes, but no batch ever holds 2 readable pairs (8 divides 24,
    # so a batch never spans two epochs, where it could hold that image twice)
    remove_images(shapes_manifest, keep=1)
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run", train={"batch_size": 8})
    with deadline(240):
        assert main(["train", config]) == 2
    error = capsys.readouterr().err
    assert f"data.path='{shapes_manifest}'" in error
    assert "50 batches in a row (400 samples) held fewer than 2 readable image-caption pairs" in error
    assert not (tmp_path / "run" / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# b. never overwrite a run unasked
# ----------------------------------------------------------------------------------------------
def test_training_again_into_a_run_is_refused_and_loses_nothing(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run", train=TINY_RUN)
    assert main(["train", config]) == 0
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", config]) == 2
    error = capsys.readouterr().err
    assert f"train.output_dir={tmp_path / 'run'} already holds a run (last.pt)" in error
    assert "--resume latest" in error and "--overwrite" in error
    assert snapshot(tmp_path / "run") == before


def test_a_folder_with_only_metrics_is_a_run_too(shapes_manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match=r"already holds a run \(metrics.jsonl\)"):
        train(tiny_config(shapes_manifest, tmp_path / "run", train=TINY_RUN))
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [{"step": 5, "loss": 1.0}]


def test_overwrite_removes_the_old_runs_files_and_nothing_else(
    shapes_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    first = {"steps": 4, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 4}
    train(tiny_config(shapes_manifest, run, train=first, logging={"log_every": 1}))
    (run / "best.pt").write_bytes(b"an old best")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.old").write_bytes(b"old events")
    (run / "notes.txt").write_text("mine")
    caplog.set_level(logging.INFO, logger="clipforge")
    second = {"steps": 2, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 4}
    result = train(tiny_config(shapes_manifest, run, train=second, logging={"log_every": 1}), overwrite=True)
    assert result.step == 2
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_1.pt", "step_2.pt"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert not (run / "best.pt").exists() and not list((run / "tensorboard").iterdir())
    assert (run / "notes.txt").read_text() == "mine"
    assert "--overwrite: removed the earlier run's last.pt, best.pt, metrics.jsonl, step_1.pt" in caplog.text


def test_cli_overwrite_starts_afresh(shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run", train=TINY_RUN)
    assert main(["train", config]) == 0
    assert main(["train", config, "train.steps=3", "logging.log_every=1", "--overwrite"]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_overwrite_with_a_resume_from_the_same_folder_is_refused(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run", train=TINY_RUN)
    assert main(["train", config]) == 0
    before = snapshot(tmp_path / "run")
    assert main(["train", config, "--resume", "latest", "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "--overwrite would delete the run in" in error and "drop --overwrite to continue it" in error
    assert snapshot(tmp_path / "run") == before


def test_resume_from_elsewhere_into_another_run_is_refused(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source_run = train(tiny_config(shapes_manifest, tmp_path / "a", train=TINY_RUN))
    config = config_file(tmp_path, shapes_manifest, tmp_path / "b", train=TINY_RUN)
    assert main(["train", config]) == 0
    before = snapshot(tmp_path / "b")
    assert main(["train", config, "train.steps=4", "--resume", str(source_run.checkpoint)]) == 2
    assert "holds another run (last.pt) than the one --resume" in capsys.readouterr().err
    assert snapshot(tmp_path / "b") == before


def test_every_shipped_recipe_trains_into_its_own_folder() -> None:
    assert TrainConfig().output_dir == "runs/clipforge"
    for name in recipe_names():
        assert load_config(name).train.output_dir == f"runs/{name}", name


# ----------------------------------------------------------------------------------------------
# c. stale temporaries
# ----------------------------------------------------------------------------------------------
def test_stale_checkpoint_temporaries_are_removed_at_the_start(
    shapes_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"\0" * 100_000)  # what kill -9 during a write leaves
    (run / ".step_4.pt.x9.tmp").write_bytes(b"\0" * 10)
    (run / ".notes.txt.a1.tmp").write_text("not a checkpoint's")
    caplog.set_level(logging.INFO, logger="clipforge")
    train(tiny_config(shapes_manifest, run, train=TINY_RUN))
    assert sorted(p.name for p in run.glob(".*.tmp")) == [".notes.txt.a1.tmp"]
    assert f"removed {run / '.last.pt.k1ll3d.tmp'} (0.1 MB), left by an interrupted checkpoint write" in caplog.text
    assert ".step_4.pt.x9.tmp" in caplog.text


# ----------------------------------------------------------------------------------------------
# d. resume surprises
# ----------------------------------------------------------------------------------------------
def test_a_changed_schedule_on_resume_is_announced(
    shapes_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = {"steps": 4, "batch_size": 8, "checkpoint_every": 4}
    train(tiny_config(shapes_manifest, tmp_path / "run", train=run))
    caplog.set_level(logging.INFO, logger="clipforge")
    longer = tiny_config(
        shapes_manifest,
        tmp_path / "run",
        train={**run, "steps": 8},
        optim={"lr": 1e-3},
        schedule={"warmup_steps": 5, "min_lr_ratio": 0.1},
    )
    assert train(longer, resume="latest").step == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith("train.steps 4 -> 8 on resume: the cosine schedule is stretched from step 4 on") for m in warnings
    ), warnings
    assert any(m.startswith("schedule.min_lr_ratio 0.0 -> 0.1 on resume") for m in warnings), warnings
    assert any("optim.lr 0.002 -> 0.001 on resume has no effect" in m for m in warnings), warnings
    assert not any("warmup_steps" in m for m in warnings), "an unchanged setting is not reported"


def write_one_image_manifest(shapes_manifest: Path) -> Path:
    """A retrieval set of one image: every recall is 1 at every step, so no later round improves on the first."""
    source = ManifestSource(shapes_manifest)
    path = shapes_manifest.parent / "one.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerow([source.describe(0), source.captions(0)[0]])
    return path


def test_resume_into_another_folder_keeps_the_best_checkpoint_and_its_record(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    one = write_one_image_manifest(shapes_manifest)
    evaluation = {
        "every": 2,
        "best_metric": "one/image_retrieval_recall@1",
        "tasks": [{"name": "one", "task": "retrieval", "data": {"kind": "manifest", "path": str(one)}}],
    }
    first = train(tiny_config(shapes_manifest, tmp_path / "a", train=TINY_RUN, eval=evaluation))
    assert read_checkpoint(tmp_path / "a" / "best.pt").step == 2
    moved = tiny_config(shapes_manifest, tmp_path / "b", train={**TINY_RUN, "steps": 4}, eval=evaluation)
    resumed = train(moved, resume=first.checkpoint)
    assert read_checkpoint(tmp_path / "b" / "best.pt").step == 2  # step 4 ties: the best is still step 2's
    assert read_checkpoint(resumed.checkpoint).training.eval == {
        "best_metric": "one/image_retrieval_recall@1",
        "best_value": 1.0,
        "best_step": 2,
    }


def test_the_skipped_image_count_survives_a_resume(shapes_manifest: Path, tmp_path: Path) -> None:
    source = ManifestSource(shapes_manifest)
    (shapes_manifest.parent / source.describe(3)).write_bytes(b"\x89PNG broken")
    (shapes_manifest.parent / source.describe(5)).unlink()
    common = {"steps": 6, "batch_size": 12, "checkpoint_every": 3, "keep_checkpoints": 2}
    full = train(tiny_config(shapes_manifest, tmp_path / "run", train=common, logging={"log_every": 3}))
    at_step_3 = read_checkpoint(tmp_path / "run" / "step_3.pt")
    assert 0 < at_step_3.training.skipped_images < full.history[-1]["skipped_images"]
    resumed = train(
        tiny_config(shapes_manifest, tmp_path / "run", train=common, logging={"log_every": 3}),
        resume=tmp_path / "run" / "step_3.pt",
    )
    assert resumed.history[-1]["skipped_images"] == full.history[-1]["skipped_images"] == 6  # 2 a pass, 3 passes
    assert read_checkpoint(resumed.checkpoint).training.skipped_images == 6


# ----------------------------------------------------------------------------------------------
# e. numbers the config cannot hold, and a batch larger than the data
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.checkpoint_every=0", "train.checkpoint_every=0 must be positive"),
        ("train.checkpoint_every=-5", "train.checkpoint_every=-5 must be positive"),
        ("logging.log_every=0", "logging.log_every=0 must be positive"),
        ("optim.lr=-1", "optim.lr=-1.0 must be positive"),
        ("optim.lr=0", "optim.lr=0.0 must be positive"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip=-1.0 must be >= 0"),
        ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 must be >= 0"),
        ("train.batch_size=32", "train.batch_size=32 is larger than the 24 images of data.kind='manifest'"),
    ],
)
def test_impossible_numbers_are_refused_before_anything_runs(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    config = config_file(tmp_path, shapes_manifest, tmp_path / "run")
    assert main(["train", config, override]) == 2
    error = capsys.readouterr().err
    assert error.startswith("clipforge train: error: ") and message in error, error
    assert not (tmp_path / "run").exists()


def test_a_batch_as_large_as_the_data_is_allowed(shapes_manifest: Path, tmp_path: Path) -> None:
    assert train(tiny_config(shapes_manifest, tmp_path / "run", train={**TINY_RUN, "batch_size": 24})).step == 2


# ----------------------------------------------------------------------------------------------
# f. the learning rate a record logs, and the gradient norm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_each_record_logs_the_rate_its_step_used_and_the_gradient_norm(
    shapes_manifest: Path, tmp_path: Path, grad_clip: float
) -> None:
    config = tiny_config(
        shapes_manifest,
        tmp_path / "run",
        train={**TINY_RUN, "steps": 5, "grad_clip": grad_clip},
        schedule={"warmup_steps": 5},
        logging={"log_every": 1},
    )
    records = train(config).history
    # step k (1-based) is optimizer step k - 1, whose warmup factor is k / 5
    assert [r["lr"] for r in records] == pytest.approx([2e-3 * k / 5 for k in range(1, 6)], rel=1e-9)
    assert all(0 < r["grad_norm"] < float("inf") for r in records), records
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert all("grad_norm" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


# ----------------------------------------------------------------------------------------------
# g. torch.compile says it is compiling
# ----------------------------------------------------------------------------------------------
def test_compile_is_announced_before_the_first_step(
    shapes_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = []
    monkeypatch.setattr(loop.wrap, "compile_towers", lambda model, **options: compiled.append(model))
    caplog.set_level(logging.INFO, logger="clipforge")
    train(tiny_config(shapes_manifest, tmp_path / "run", train={**TINY_RUN, "compile": True}))
    assert compiled and COMPILE_NOTE in caplog.messages
    assert COMPILE_NOTE == "compiling the towers with torch.compile (inductor); the first steps take longer"


# ----------------------------------------------------------------------------------------------
# h. one summary under torchrun
# ----------------------------------------------------------------------------------------------
def test_only_the_main_process_prints_the_summary(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipforge.train.loop as command  # the command imports train() from here when it runs

    config = config_file(tmp_path, shapes_manifest, tmp_path / "run")
    other_rank = TrainResult(tmp_path / "run", 3, tmp_path / "run" / "last.pt", [], is_main=False)
    monkeypatch.setattr(command, "train", lambda config, resume=None, overwrite=False: other_rank)
    assert main(["train", config]) == 0
    assert capsys.readouterr().out == ""
    main_rank = TrainResult(tmp_path / "run", 3, tmp_path / "run" / "last.pt", [])
    monkeypatch.setattr(command, "train", lambda config, resume=None, overwrite=False: main_rank)
    assert main(["train", config]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
