"""What `clipforge train` shows: to a log file or a pipe, plain lines (a start summary, one line every
``logging.log_every`` steps, each evaluation on its own line, never a ``\\r`` frame), with ``logging.progress`` on or
off; on a terminal, tqdm's progress bar instead of the step lines."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from clipforge.config import save_config
from clipforge.interop.load import load_checkpoint
from clipforge.train.run_log import LineProgress, progress_bar
from tests.conftest import tiny_config, write_shapes_manifest

STEPS, LOG_EVERY = 10, 5
LINE = re.compile(r"^\d\d:\d\d:\d\d INFO ")  # the log format of `clipforge`: time, level, message


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: 10 steps, a line every 5, a retrieval evaluation every 5 steps."""
    folder = tmp_path_factory.mktemp("output")
    manifest = write_shapes_manifest(folder / "shapes")
    evaluation = {
        "every": 5,
        "tasks": [{"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}}],
    }
    config = tiny_config(
        manifest,
        folder / "run",
        train={"steps": STEPS, "checkpoint_every": STEPS},
        logging={"log_every": LOG_EVERY},
        eval=evaluation,
    )
    save_config(config, folder / "tiny.yaml")
    return folder


def train_command(folder: Path, name: str, progress: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "clipforge",
        "train",
        str(folder / "tiny.yaml"),
        f"train.output_dir={folder / name}",
        f"logging.progress={'true' if progress else 'false'}",
    ]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "100"}


@pytest.mark.parametrize("progress", [True, False])
def test_a_log_file_gets_plain_lines(recipe: Path, progress: bool) -> None:
    name = f"file-{progress}"
    finished = subprocess.run(
        train_command(recipe, name, progress),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    output = finished.stderr
    assert "\r" not in output  # no tqdm frames: every line ends where it should
    lines = output.splitlines()
    step_lines = [line for line in lines if " INFO step " in line]
    assert [re.search(r"step (\d+)/10", line).group(1) for line in step_lines] == ["5", "10"]  # one per log_every
    for line in step_lines:
        assert LINE.match(line) and all(
            f"  {key} " in line for key in ("loss", "lr", "logit_scale", "samples_per_second")
        )
    evaluations = [line for line in lines if "eval at step" in line]
    assert len(evaluations) == 2 and all(LINE.match(line) and line.count(" INFO ") == 1 for line in evaluations)
    assert all("shapes/image_retrieval_recall@1=" in line for line in evaluations)  # each on a line of its own
    # the start summary, before the first step
    model = load_checkpoint(recipe / name / "last.pt").model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = [line for line in lines if "training 10 steps" in line or "parameters:" in line]
    assert len(summary) == 2 and lines.index(summary[0]) < lines.index(step_lines[0])
    assert summary[0].endswith("training 10 steps of 16 pairs on 24 image-text pairs (manifest), 0 loader workers")
    assert summary[1].endswith(
        f"parameters: {trainable:,} trainable of {total:,}; device cpu; precision fp32 (set by train.precision)"
    )


def run_in_a_terminal(command: list[str]) -> str:
    """Run ``command`` with stdout and stderr on a pseudo-terminal (a person watching); return what it showed."""
    leader, follower = pty.openpty()
    # a terminal of 30 rows of 120 columns (a new pseudo-terminal has 0 x 0, where tqdm draws an empty bar)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(command, env=environment(), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    shown = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 300)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not data:
            break
        shown += data
    os.close(leader)
    assert process.wait(timeout=60) == 0, shown.decode(errors="replace")[-3000:]
    return shown.decode(errors="replace")


def test_a_terminal_gets_the_progress_bar(recipe: Path) -> None:
    shown = run_in_a_terminal(train_command(recipe, "terminal", progress=True))
    assert "train:" in shown and "\r" in shown and "10/10" in shown  # tqdm's bar, redrawn in place
    assert " INFO step " not in shown  # the figures are on the bar, not on lines
    assert "eval at step 5" in shown  # log lines are printed above the bar


def test_progress_for_a_log_file_is_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="clipforge"):
        with progress_bar(10, "caching images", "row", initial=2) as bar:  # not a terminal here: plain lines
            assert isinstance(bar, LineProgress)
            bar.every_s = 0.0
            bar.update(3)
            bar.update(5)
        assert isinstance(progress_bar(10, "quiet", "row", enabled=False), tqdm)  # disabled: shows nothing
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        "caching images: 5 of 10 (50%)",
        "caching images: 10 of 10 (100%)",
    ]
    assert all(line.endswith("row/s") and "\r" not in line for line in lines)
