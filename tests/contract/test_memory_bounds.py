"""Class 3 of the promises, measured from outside: memory stays bounded where bytes become objects.

Each command runs in a subprocess (of a small launcher) and its peak resident memory is read from the kernel
(``wait4``'s ``ru_maxrss``), against a bound stated here: the same command on an ordinary input plus a margin. The hostile
inputs are small files that decode (or expand) into something huge: a 4 KB PNG of 1 x 1,000,000 pixels (a
shortest-edge resize to the tower's size would make it 64 x 64,000,000), a CSV whose caption is 50 MB, a tar
whose member declares 8 GB.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.contract.conftest import World

# what a command may use on top of what the same command uses on ordinary input
MARGIN_MB = 400


# A launcher between pytest and the command: Linux carries a process's peak RSS across fork and exec (the
# kernel keeps the larger of the old and new address space's high-water mark), so a command started straight
# from a pytest process that has grown to 1.7 GB reports 1.7 GB whatever it used. The launcher is small when it
# starts the command, and reports the command's own peak from wait4.
_LAUNCHER = """
import os, subprocess, sys
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_mb(argv: list[str]) -> tuple[int, float, str]:
    """(exit code, peak RSS in MB, stderr) of ``clipforge argv`` run as a subprocess of a small launcher."""
    launched = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-m", "clipforge", *argv],
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    code, peak_kb = launched.stdout.decode().split()[-2:]
    return int(code), int(peak_kb) / 1024, launched.stderr.decode(errors="replace")


def tall_png(path: Path, width: int = 1, height: int = 1_000_000) -> Path:
    Image.new("L", (width, height), 200).save(path, optimize=True)
    return path


@pytest.fixture(scope="module")
def baseline(world: World, tmp_path_factory) -> dict[str, float]:
    folder = tmp_path_factory.mktemp("baseline")
    search = ["search", "--index", str(world.store), "--checkpoint", str(world.checkpoint), "--image", str(world.photo)]
    embed = ["embed", "--checkpoint", str(world.checkpoint), "--images", str(world.images), "--out", str(folder / "e")]
    figures = {}
    for name, argv in (("search", search), ("embed", embed)):
        code, peak, err = peak_mb(argv)
        assert code == 0, err
        figures[name] = peak
    return figures


def test_a_one_pixel_wide_strip_is_searched_within_bounded_memory(
    world: World, baseline: dict[str, float], tmp_path: Path
) -> None:
    strip = tall_png(tmp_path / "strip.png")
    assert strip.stat().st_size < 64_000
    argv = ["search", "--index", str(world.store), "--checkpoint", str(world.checkpoint), "--image", str(strip)]
    code, peak, err = peak_mb(argv)
    assert code in (0, 2) and "Traceback" not in err, err
    assert peak < baseline["search"] + MARGIN_MB, f"peak {peak:.0f} MB vs {baseline['search']:.0f} MB ordinary"


def test_a_folder_with_strips_is_embedded_within_bounded_memory(
    world: World, baseline: dict[str, float], tmp_path: Path
) -> None:
    images = Path(shutil.copytree(world.images, tmp_path / "images"))
    tall_png(images / "tall.png")
    tall_png(images / "wide.png", width=1_000_000, height=1)
    argv = ["embed", "--checkpoint", str(world.checkpoint), "--images", str(images), "--out", str(tmp_path / "emb")]
    code, peak, err = peak_mb(argv)
    assert code == 0 and "Traceback" not in err, err
    assert peak < baseline["embed"] + MARGIN_MB, f"peak {peak:.0f} MB vs {baseline['embed']:.0f} MB ordinary"


def test_a_50_mb_caption_is_cut_not_a_crash(world: World, tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.csv"
    image = shutil.copy(next(world.images.glob("*.png")), tmp_path / "a.png")
    caption = "word " * 10_000_000  # 50 MB: far above csv's own field limit and the caption bound
    manifest.write_text(f"image,caption\n{Path(image).name},{caption}\n{Path(image).name},a short one\n")
    argv = ["data", "inspect", "kind=manifest", f"path={manifest}"]
    code, peak, err = peak_mb(argv)
    assert code == 2 and "Traceback" not in err, err  # the 50 MB line is longer than any data row
    assert "longer than" in err and "line 2" in err
    assert peak < 1500


def test_a_tar_member_that_declares_gigabytes_is_skipped_not_read(world: World, tmp_path: Path) -> None:
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in range(3):
            for extension, payload in ((".txt", b"a small red circle"), (".png", _png_bytes())):
                info = tarfile.TarInfo(f"{key:05d}{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = bytearray(shard.read_bytes())
    # declare the first image member 8 GB long: its header's size field, octal
    offset = 512 + 512 * ((len(b"a small red circle") + 511) // 512)
    data[offset + 124 : offset + 136] = b"%011o\x00" % (8 << 30)
    checksum = sum(data[offset : offset + 148]) + 8 * 32 + sum(data[offset + 156 : offset + 512])
    data[offset + 148 : offset + 156] = b"%06o\x00 " % checksum
    shard.write_bytes(bytes(data))
    code, peak, err = peak_mb(["data", "inspect", str(shard)])
    assert code in (0, 2) and "Traceback" not in err, err
    assert peak < 1500


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()
