"""``clipforge data pack`` / ``inspect``: any source -> shards -> the same images, captions and labels."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.config import data_config_from_dict
from clipforge.data.base import decode_image
from clipforge.data.pack import inspect_source, pack_source
from clipforge.data.shards import ShardSource
from tests.conftest import COLOURS, SHAPES, draw_shape
from tests.data.shard_helpers import png_bytes, shapes_samples, write_shards


def labelled_manifest(folder: Path) -> tuple[Path, list[dict]]:
    """12 PNG shapes (plus one corrupt file) in a JSONL manifest with caption lists and colour labels."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"images/{colour}_{shape}.png"
            (folder / name).write_bytes(png_bytes(draw_shape(colour, shape, "large", image_size=40)))
            rows.append({"image": name, "captions": [f"a {colour} {shape}", f"{shape}, {colour}"], "label": colour})
    (folder / "images" / "broken.png").write_bytes(b"\x89PNG but not really")
    rows.insert(5, {"image": "images/broken.png", "caption": "never packed", "label": "red"})
    manifest = folder / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, [row for row in rows if "captions" in row]


def test_pack_then_read_round_trip(tmp_path: Path) -> None:
    manifest, rows = labelled_manifest(tmp_path / "src")
    config = data_config_from_dict({"kind": "manifest", "path": str(manifest)})
    result = pack_source(config, tmp_path / "shards", shard_size=5)
    assert (result.written, result.skipped, len(result.shards)) == (12, 1, 3)
    assert result.spec == str(tmp_path / "shards" / "{00000..00002}.tar")
    samples = list(ShardSource(result.spec).iter_samples())
    assert [s.captions for s in samples] == [row["captions"] for row in rows]
    assert [s.classname for s in samples] == [row["label"] for row in rows]
    assert [s.label for s in samples] == [sorted(COLOURS).index(row["label"]) for row in rows]
    for sample, row in zip(samples, rows, strict=True):  # PNG files travel as they are: pixel-identical
        assert sample.image_extension == "png" and sample.image == (tmp_path / "src" / row["image"]).read_bytes()

    small = pack_source(config, tmp_path / "small", shard_size=100, max_side=16)
    assert small.spec == str(tmp_path / "small" / "00000.tar")
    resized = list(ShardSource(small.spec).iter_samples())
    assert all(s.image_extension == "jpg" and decode_image(s.image).size == (16, 16) for s in resized)
    assert [s.captions for s in resized] == [row["captions"] for row in rows]


def test_repacking_shards_keeps_their_bytes(tmp_path: Path) -> None:
    samples = shapes_samples()
    spec = write_shards(tmp_path / "in", samples, 7, writer="webdataset")
    result = pack_source(data_config_from_dict({"kind": "webdataset", "path": spec}), tmp_path / "out", 10)
    repacked = list(ShardSource(result.spec).iter_samples())
    assert [s.image for s in repacked] == [s["jpg"] for s in samples]
    assert [(s.captions, s.label) for s in repacked] == [([s["caption"]], s["label"]) for s in samples]


def test_inspect_counts_captions_classes_and_unreadable_images(tmp_path: Path) -> None:
    manifest, _ = labelled_manifest(tmp_path)
    report = inspect_source(
        data_config_from_dict({"kind": "manifest", "path": str(manifest)}), tmp_path / "grid.png", 4
    )
    assert (report.images, report.unreadable, report.captions) == (13, 1, 25)
    assert "broken.png" in report.unreadable_examples[0]
    # 12 images x ("a red circle": 3 words, "circle, red": 2) + "never packed": 2
    assert report.caption_words == {"min": 2.0, "mean": pytest.approx(62 / 25), "median": 2.0, "max": 3.0}
    assert report.classes == {"red": 4, "blue": 3, "green": 3, "yellow": 3}
    assert Image.open(report.grid).size[0] > 100
    text = report.format()
    assert "images: 13 (1 unreadable)" in text and "captions: 25 (1.92 per image)" in text
    assert "caption words: min 2, mean 2.5, median 2.0, max 3" in text and "  red: 4" in text


def test_pack_and_inspect_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest, _ = labelled_manifest(tmp_path / "src")
    out = tmp_path / "shards"
    assert main(["data", "pack", "kind=manifest", f"path={manifest}", str(out), "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    spec = str(out / "{00000..00002}.tar")
    assert "packed 12 images into 3 shards (1 unreadable left out)" in printed and spec in printed

    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", spec, "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "kind: webdataset (3 shards)" in printed and "images: 12 (0 unreadable)" in printed
    assert "classes: 4" in printed and grid.is_file()
    assert np.asarray(Image.open(grid)).std() > 0

    assert main(["data", "pack", "kind=manifest", f"path={manifest}", str(out)]) == 2  # never mixes old shards
    assert "already holds .tar files" in capsys.readouterr().err
