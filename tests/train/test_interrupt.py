"""Exact resume after SIGINT, SIGTERM and SIGKILL at random points, checked from outside: ``clipforge train`` runs
as a subprocess (two loader workers, its own process group, as a terminal runs it), is signalled at a random
moment - while loading, mid-step, while writing a checkpoint - then resumed with ``--resume latest``; its final
weights must equal those of a run that was never stopped, bit for bit.

SIGINT goes to the whole process group (what Ctrl-C does, workers included), SIGTERM to the main process
(what ``kill`` does), SIGKILL to the group. The first two must end with one line and exit code 130 / 143, no
traceback; after SIGKILL the last checkpoint written must be whole.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import read_checkpoint
from clipforge.config import save_config
from clipforge.train.run_log import read_metrics
from tests.conftest import tiny_config, write_shapes_manifest

STEPS = 24
# the seed of the interruption points; printed on failure so a failing case can be replayed
SEED = int(os.environ.get("CLIPFORGE_INTERRUPT_SEED", "20261207"))
CASES = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clipforge", "train", str(config), *extra]


def _environment() -> dict[str, str]:
    # one thread everywhere: float sums then do not depend on how the work is split, so runs compare bit for bit
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _config(tmp_path: Path, manifest: Path, name: str) -> Path:
    config = tiny_config(
        manifest,
        tmp_path / name,
        train={"steps": STEPS, "batch_size": 8, "checkpoint_every": 3, "seed": 3},
        data={"kind": "manifest", "path": str(manifest), "num_workers": 2, "augment": {"scale_min": 0.7}},
        logging={"log_every": 1, "backends": [], "progress": False},
    )
    path = tmp_path / f"{name}.yaml"
    save_config(config, path)
    return path


def _finish(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(config, "--resume", "latest"), env=_environment(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_manifest(tmp_path_factory.mktemp("interrupt") / "shapes")


@pytest.fixture(scope="module")
def uninterrupted(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    tmp_path = tmp_path_factory.mktemp("reference")
    config = _config(tmp_path, shapes, "reference")
    done = subprocess.run(_command(config), env=_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return read_checkpoint(tmp_path / "reference" / "last.pt").weights


def _interrupt(config: Path, run: Path, number: int, rng: random.Random) -> tuple[int, str]:
    """Start the run, wait until it has logged a random step (or a random moment after it), send the case's
    signal; return (exit code, stderr)."""
    process = subprocess.Popen(
        _command(config),
        env=_environment(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: killpg reaches the loader workers, as Ctrl-C would
    )
    target_step, extra_delay = rng.randint(1, STEPS - 4), rng.uniform(0.0, 0.08)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        records = read_metrics(run / "metrics.jsonl")
        if records and records[-1].get("step", 0) >= target_step:
            break
        time.sleep(0.005)
    time.sleep(extra_delay)  # somewhere inside the next step, its loading or its checkpoint write
    sent = CASES[number]
    try:
        if sent == signal.SIGTERM:
            os.kill(process.pid, sent)
        else:
            os.killpg(process.pid, sent)
    except ProcessLookupError:
        pass  # it finished first: the resume below must then have nothing left to do
    _, stderr = process.communicate(timeout=180)
    return process.returncode, stderr


@pytest.mark.parametrize("number", range(len(CASES)), ids=[f"{CASES[i].name}-{i}" for i in range(len(CASES))])
def test_a_run_signalled_at_a_random_point_resumes_to_the_same_weights(
    number: int, shapes: Path, uninterrupted: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    rng = random.Random(SEED * 100 + number)
    config = _config(tmp_path, shapes, "run")
    run = tmp_path / "run"
    code, stderr = _interrupt(config, run, number, rng)
    sent = CASES[number]
    context = f"case {number} (seed {SEED}): {sent.name}, exit {code}\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, context
    if code != 0:  # 0: the run finished before the signal arrived
        expected = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}[sent]
        assert code == expected, context
    if sent != signal.SIGKILL and code != 0:
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("clipforge train: stopped by"), context
        assert "--resume latest" in last_line or "nothing was trained yet" in last_line, context
    done = _finish(config)
    assert done.returncode == 0, f"{context}\nresume: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    resumed = read_checkpoint(run / "last.pt")
    assert resumed.step == STEPS
    differing = [key for key, value in uninterrupted.items() if not torch.equal(value, resumed.weights[key])]
    assert not differing, f"{context}\nweights differ from the uninterrupted run: {differing[:5]}"
    assert not list(run.glob(".*.tmp")), "a killed checkpoint write's temporary file was not removed"
