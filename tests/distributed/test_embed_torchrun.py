"""`torchrun --nproc-per-node=2 -m clipforge embed`: two gloo processes write one embedding folder that holds the
same rows, in the same order, with the same bits, as one process writes; a run killed midway is taken up again by
its plan, each process redoing only its unfinished parts, and ends as the uninterrupted run.

Why the bits can match: a run is laid out in chunks and blocks that do not depend on the number of processes
(``clipforge.search.plan``), so every chunk goes through the model in the same batches whatever N.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.search.store import EmbeddingStore
from tests.distributed.helpers import LAUNCH_TIMEOUT_S, free_port, launch, worker_environment

IMAGES = 160
# small chunks and parts, so that the 160 images make 40 blocks dealt to the two processes in turn
LAYOUT = ["--flush-every", "2", "--part-rows", "4", "--batch-size", "2"]


def write_pictures(folder: Path, count: int) -> Path:
    """``count`` distinct small pictures (smooth colour fields, each its own seed), and one file that is no image."""
    folder.mkdir(parents=True)
    grid = np.linspace(0.0, 1.0, 24, dtype=np.float32)
    for number in range(count):
        generator = np.random.default_rng(number)
        weights = generator.uniform(-1, 1, size=(3, 3))
        field = weights[:, 0, None, None] * grid[None, :, None] + weights[:, 1, None, None] * grid[None, None, :]
        pixels = ((np.tanh(field + weights[:, 2, None, None]) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"picture-{number:04d}.png")
    (folder / "picture-0077-broken.png").write_bytes(b"not a png")
    return folder


@pytest.fixture(scope="module")
def collection(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(work folder, the embed arguments but --out): pictures and captions, and the one-process folder `one`."""
    folder = tmp_path_factory.mktemp("embed-torchrun")
    pictures = write_pictures(folder / "pictures", IMAGES)
    (folder / "captions.txt").write_text("\n".join(f"caption number {n}" for n in range(30)) + "\n")
    arguments = ["embed", "--checkpoint", str(tiny_checkpoint[0]), "--images", str(pictures), *LAYOUT]
    output = launch([*arguments, "--texts", "captions.txt", "--out", "one"], processes=1, cwd=folder)
    assert f"images: embedded {IMAGES}, already in" in output and "failed: 1" in output
    return folder, arguments


def stored_files(folder: Path) -> dict[str, bytes]:
    """Every file of an embedding folder's parts and lists, by name within the folder."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for kind in ("images", "texts")
        for path in sorted((folder / kind).glob("*"))
    }


def test_two_processes_write_what_one_writes(collection: tuple[Path, list[str]]) -> None:
    folder, arguments = collection
    output = launch([*arguments, "--texts", "captions.txt", "--out", "two"], processes=2, cwd=folder)
    assert output.count(f"images: embedded {IMAGES}, already in") == 1  # rank 0 alone reports, the sum of both
    assert output.count("texts: embedded 30, already in") == 1
    assert re.search(r"embedded 160 images in [0-9.]+ s: [0-9.]+/s with 2 processes", output)  # process 0's account
    one, two = stored_files(folder / "one"), stored_files(folder / "two")
    assert sorted(one) == sorted(two) and "images/failed.jsonl" in one
    parts = [name for name in one if name.startswith("images/part-") and name.endswith(".npy")]
    assert len(parts) == 41  # 161 files in blocks of 4, the broken one listed in failed.jsonl
    for name, data in one.items():
        assert two[name] == data, name  # the same rows in the same order, the same float16 bits
    store = EmbeddingStore(folder / "two")
    ids = store.table("images").ids
    assert ids == sorted(ids) and len(ids) == IMAGES  # input order: the folder's files, sorted
    assert not list((folder / "two" / "images").glob("plan-*"))  # the finished run's plan is gone
    again = launch([*arguments, "--out", "two"], processes=2, cwd=folder)
    assert f"images: embedded 0, already in two: {IMAGES}, failed: 1" in again  # the broken file is retried


def test_a_killed_run_is_taken_up_and_each_process_redoes_only_its_unfinished_parts(
    collection: tuple[Path, list[str]],
) -> None:
    folder, arguments = collection
    out = folder / "killed"
    kill_midway(arguments, out, cwd=folder)
    plans = list((out / "images").glob("plan-*.npz"))
    assert len(plans) == 1, "the run finished before it could be stopped"
    before = committed_parts(out)
    assert 0 < sum(rows for rows, _ in before.values()) < IMAGES
    output = launch([*arguments, "--out", str(out)], processes=2, cwd=folder)
    done_before = sum(rows for rows, _ in before.values())
    assert f"images: embedded {IMAGES - done_before}, already in {out}: {done_before}" in output
    after = committed_parts(out)
    for name, (rows, inode) in before.items():
        if name.count("-") == 2:  # a block's merged part: kept as it was, not written again
            assert after[name] == (rows, inode), name
    one, resumed = stored_files(folder / "one"), stored_files(out)
    assert sorted(name for name in resumed if name.startswith("images/part-")) == sorted(
        name for name in one if name.startswith("images/part-")
    )
    for name in resumed:
        if name.startswith("images/part-"):
            assert resumed[name] == one[name], name


def committed_parts(folder: Path) -> dict[str, tuple[int, int]]:
    """Committed image parts by name: (rows, inode of the .npy)."""
    return {
        path.stem: (int(np.load(path, mmap_mode="r").shape[0]), path.stat().st_ino)
        for path in (folder / "images").glob("part-*.npy")
        if path.with_suffix(".jsonl").is_file()
    }


def kill_midway(arguments: list[str], out: Path, cwd: Path) -> None:
    """Start the 2-process run and kill it (SIGKILL, every process) once it has committed a few parts."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "clipforge",
        *arguments,
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=worker_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if len(committed_parts(out)) >= 6 if (out / "images").is_dir() else False:
                break
            time.sleep(0.005)
    finally:
        for pid in [*descendants(process.pid), process.pid]:  # torchrun starts each worker in its own session
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc: each process's parent is the 4th field of its stat line)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
