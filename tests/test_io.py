"""The file promises every command goes through (``clipforge.io``): whole or nothing, never over an input or an
existing file unasked, one writer per folder, and what killed processes leave behind swept away."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipforge.folders import folder_lock, folder_owner, scratch_folder, staged_folder
from clipforge.io import (
    DiskWriteError,
    FolderBusyError,
    OutputExistsError,
    OutputIsInputError,
    atomic_write,
    atomic_write_text,
    output_policy,
    shown,
    sweep_stale_temporaries,
)
from tests.conftest import another_writer


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    target.write_text("old")

    def broken(handle) -> None:
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken, replace=True)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_written_file_has_the_umask_mode_not_0600(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


def test_an_existing_file_is_replaced_only_by_its_owner_or_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("mine")
    with pytest.raises(OutputExistsError, match="exists already.*--overwrite"):
        atomic_write_text(target, "new")
    assert target.read_text() == "mine"
    atomic_write_text(target, "owner", replace=True)
    assert target.read_text() == "owner"
    with output_policy(overwrite=True):
        atomic_write_text(target, "asked")
    assert target.read_text() == "asked"


def test_the_commit_never_clobbers_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    target = tmp_path / "out.json"

    def race(handle) -> None:
        handle.write(b"ours")
        target.write_text("theirs")  # another process writes the name while ours is being written

    with pytest.raises(OutputExistsError, match="appeared while"):
        atomic_write(target, race)
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotdot"])
def test_an_input_is_never_written_even_with_overwrite(how: str, tmp_path: Path) -> None:
    source = tmp_path / "data" / "pairs.csv"
    source.parent.mkdir()
    source.write_text("image,caption\n")
    target = {
        "same": source,
        "symlink": tmp_path / "link.csv",
        "hardlink": tmp_path / "hard.csv",
        "dotdot": tmp_path / "data" / ".." / "data" / "pairs.csv",
    }[how]
    if how == "symlink":
        target.symlink_to(source)
    if how == "hardlink":
        os.link(source, target)
    with output_policy(overwrite=True, inputs=[source]), pytest.raises(OutputIsInputError, match="inputs"):
        atomic_write_text(target, "results", replace=True)
    assert source.read_text() == "image,caption\n"


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipforge import io as clipforge_io

    def full(_descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(clipforge_io.os, "fsync", full)
    with pytest.raises(DiskWriteError, match="No space left on device; the disk is full: free some space"):
        atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_filesystem_is_one_clear_error(tmp_path: Path) -> None:
    """A real read-only mount where this machine allows mounting (root in a container); skipped elsewhere."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("mounting a read-only tmpfs is not allowed here")
    try:
        with pytest.raises(DiskWriteError, match="read-only.*write to another folder"):
            atomic_write_text(mount / "x.json", "{}")
        with pytest.raises(DiskWriteError, match="read-only"):
            with folder_lock(mount, "embed"):
                pass
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_second_writer_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with another_writer(folder, "train") as pid:
        with pytest.raises(FolderBusyError, match=f"pid {pid}, clipforge train"):
            with folder_lock(folder, "embed"):
                pass
    # the holder has exited (its lock died with it): the folder is free again
    with folder_lock(folder, "embed"):
        with folder_lock(folder, "embed"):  # the holder itself may take it again
            pass
    assert folder_owner(folder) == "embed"


def test_a_killed_writers_temporaries_are_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".last.pt.{dead_pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    stale_scratch = tmp_path / f".clipforge-scratch.{dead_pid}.xyz"
    stale_scratch.mkdir()
    (stale_scratch / "image_encoder.onnx").write_bytes(b"half")
    live = tmp_path / f".meta.json.{os.getpid()}.def456.tmp"
    live.write_bytes(b"being written")
    other = tmp_path / ".hidden-file-of-the-user.tmp"
    other.write_bytes(b"not ours")
    removed = sweep_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_scratch])
    assert live.exists() and other.exists()


def test_a_staged_folder_moves_everything_or_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "b.txt").write_text("someone's")
    with pytest.raises(OutputExistsError, match="b.txt exists already"):
        with staged_folder(folder, "export") as scratch:
            (scratch / "a.txt").write_text("new a")
            (scratch / "b.txt").write_text("new b")
    assert sorted(p.name for p in folder.iterdir()) == [".clipforge.lock", "b.txt"]
    assert (folder / "b.txt").read_text() == "someone's"
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), staged_folder(fresh, "export") as scratch:
        (scratch / "a.txt").write_text("a")
        raise RuntimeError("the export failed its check")
    assert not fresh.exists()  # made here, failed: no trace


def test_a_scratch_folder_is_removed_after_use(tmp_path: Path) -> None:
    with scratch_folder(tmp_path) as scratch:
        (scratch / "x").write_text("x")
        assert scratch.name.startswith(f".clipforge-scratch.{os.getpid()}.")
    assert list(tmp_path.iterdir()) == []


def test_a_value_echoed_in_a_message_is_bounded_while_it_is_built() -> None:
    nested: list = []
    for _ in range(30):
        nested = [nested, nested]  # 2^30 leaves if printed whole
    assert len(shown(nested)) < 200
    assert len(shown("x" * 10_000_000)) < 200
