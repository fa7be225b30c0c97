"""torchvision datasets as sources, on tiny files written in the datasets' own formats (never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.data.base import DataError
from clipforge.data.torchvision_datasets import TorchvisionSource

CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def write_stl10(root: Path, labels: list[int]) -> np.ndarray:
    """STL-10's binary layout: stl10_binary/test_X.bin (N x 3 x 96 x 96 uint8, column-major), test_y.bin (1..10)."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (len(labels), 96, 96, 3), dtype=np.uint8)  # (N, H, W, C)
    # the file stores each image channel by channel, each channel column by column
    images.transpose(0, 3, 2, 1).tofile(folder / "test_X.bin")
    np.asarray([label + 1 for label in labels], dtype=np.uint8).tofile(folder / "test_y.bin")
    (folder / "class_names.txt").write_text("\n".join(CLASSES) + "\n")
    return images


def test_stl10_binary_files_give_images_and_class_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as datasets

    images = write_stl10(tmp_path, [3, 0, 9])
    # torchvision checks the real files' MD5 sums; tiny stand-ins cannot match them
    monkeypatch.setattr(datasets.STL10, "_check_integrity", lambda self: True)
    source = TorchvisionSource("STL10", str(tmp_path), "test")
    assert len(source) == 3 and source.classnames == CLASSES
    assert source.labels.tolist() == [3, 0, 9]
    assert [source.captions(i) for i in range(3)] == [["cat"], ["airplane"], ["truck"]]
    assert np.array_equal(np.asarray(source.load_image(0)), images[0])  # pixels in the right orientation
    assert "STL10" in source.describe(2)


def test_food101_folders_give_sorted_class_names(tmp_path: Path) -> None:
    base = tmp_path / "food-101"
    meta = {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/7"]}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "test.json").write_text(json.dumps(meta))
    for items in meta.values():
        for item in items:
            path = base / "images" / f"{item}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 10), "red").save(path)
    source = TorchvisionSource("Food101", str(tmp_path), "test")
    assert source.classnames == ["apple_pie", "waffles"] and source.labels.tolist() == [0, 0, 1]
    assert source.load_image(2).size == (20, 10)


def test_missing_files_say_clipforge_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="never downloads"):
        TorchvisionSource("Food101", str(tmp_path), "test")


def test_pickle_readers_are_refused_with_the_safe_kind(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data.kind=cifar"):
        TorchvisionSource("CIFAR10", str(tmp_path), "test")


def test_an_unknown_name_lists_the_datasets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a torchvision dataset; one of .*STL10"):
        TorchvisionSource("STL11", str(tmp_path), "test")


def test_a_split_the_dataset_does_not_have_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split=train or split=test"):
        TorchvisionSource("MNIST", str(tmp_path), "val")


def test_data_kind_torchvision_evaluates_zero_shot_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: tuple[Path, Path], capsys
) -> None:
    import torchvision.datasets as datasets

    from clipforge.cli import main

    write_stl10(tmp_path / "stl", [0, 1, 2, 3])
    monkeypatch.setattr(datasets.STL10, "_check_integrity", lambda self: True)
    checkpoint, _ = tiny_checkpoint
    data = ["kind=torchvision", "name=STL10", f"path={tmp_path / 'stl'}", "split=test"]
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "zeroshot", "--data", *data]) == 0
    assert "acc1" in capsys.readouterr().out


def test_data_kind_torchvision_needs_a_name(tmp_path: Path, capsys) -> None:
    from clipforge.cli import main

    assert main(["data", "inspect", "kind=torchvision", f"path={tmp_path}"]) == 2
    assert "needs data.name: the torchvision.datasets class" in capsys.readouterr().err
