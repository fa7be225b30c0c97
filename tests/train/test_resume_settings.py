"""Settings changed on resume do what the log and ``config.yaml`` say: a stretched schedule's next step takes the
new schedule's rate (not the old one's last), and an optimizer setting that the checkpoint overrides is recorded
as the checkpoint's, not as the value that had no effect."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from clipforge.checkpoint import read_checkpoint
from clipforge.train.loop import train
from clipforge.train.optim import lr_multiplier
from clipforge.train.run_log import read_metrics
from tests.conftest import tiny_config

TINY = {"batch_size": 8, "checkpoint_every": 6, "steps": 6}
LOG_EVERY_STEP = {"log_every": 1, "backends": [], "progress": False}


def test_a_cosine_run_stretched_on_resume_takes_the_new_schedules_rate_at_once(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    schedule = {"kind": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.0}
    train(tiny_config(shapes_manifest, run, train=TINY, schedule=schedule, logging=LOG_EVERY_STEP))
    assert read_metrics(run / "metrics.jsonl")[-1]["lr"] > 0  # step 6 of 6 used a small, non-zero rate
    config = tiny_config(shapes_manifest, run, train={**TINY, "steps": 10}, schedule=schedule, logging=LOG_EVERY_STEP)
    train(config, resume="latest")
    records = {record["step"]: record["lr"] for record in read_metrics(run / "metrics.jsonl")}
    base = config.optim.lr
    for step in range(7, 11):  # record of step s: the rate optimizer step s - 1 (0-based) used
        assert records[step] == pytest.approx(base * lr_multiplier(step - 1, 10, config.schedule), rel=1e-9)
    assert records[7] > 1e-5, "the first resumed step trained with the old schedule's final rate"


def test_an_optimizer_setting_without_effect_on_resume_is_said_and_not_recorded(
    shapes_manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    train(tiny_config(shapes_manifest, run, train=TINY, logging=LOG_EVERY_STEP))
    original = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        changed = tiny_config(
            shapes_manifest, run, train={**TINY, "steps": 8}, optim={"lr": 5e-3}, logging=LOG_EVERY_STEP
        )
        train(changed, resume="latest")
    assert "optim.lr 0.002 -> 0.005 on resume has no effect" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == original
    assert read_checkpoint(run / "last.pt").config.optim.lr == original
    assert read_metrics(run / "metrics.jsonl")[-1]["lr"] < original  # the checkpoint's schedule, decaying


def test_resume_latest_in_a_folder_whose_first_attempt_never_finished_a_step_starts_afresh(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")  # what a run that failed before its first step leaves
    config = tiny_config(shapes_manifest, run, train=TINY, logging=LOG_EVERY_STEP)
    result = train(config, resume="latest")
    assert result.step == 6 and read_checkpoint(run / "last.pt").step == 6
    again = tiny_config(shapes_manifest, tmp_path / "second", train=TINY, logging=LOG_EVERY_STEP)
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "metrics.jsonl").write_text("")
    assert train(again).step == 6  # a fresh run is not blocked by the empty log either
