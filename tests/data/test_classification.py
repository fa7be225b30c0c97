"""imagefolder, MNIST-family IDX and CIFAR pickle sources, from tiny files written in the real formats."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.config import DataConfig
from clipforge.data.base import ImageLoadError, ImageTextSource
from clipforge.data.classification import ImageFolderSource, read_cifar, read_idx
from clipforge.data.files import shipped_classnames
from clipforge.data.sources import build_source


# ----------------------------------------------------------------------------------------------
# imagefolder
# ----------------------------------------------------------------------------------------------
def write_folder(root: Path) -> None:
    for folder, count in (("n02_golden_retriever", 2), ("n01_tabby_cat", 3)):
        for i in range(count):
            (root / folder / "sub").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), (i * 40, 0, 0)).save(root / folder / ("sub" if i == 2 else "") / f"{i}.png")
    (root / "n01_tabby_cat" / "notes.txt").write_text("not an image")


def test_imagefolder_labels_follow_sorted_folders(tmp_path: Path) -> None:
    write_folder(tmp_path)
    source = build_source(DataConfig(kind="imagefolder", path=str(tmp_path)))
    assert isinstance(source, ImageTextSource) and len(source) == 5
    assert source.classnames == ["n01 tabby cat", "n02 golden retriever"]
    assert source.labels.tolist() == [0, 0, 0, 1, 1]
    assert source.describe(2).endswith("n01_tabby_cat/sub/2.png")
    assert source.captions(4) == ["n02 golden retriever"] and source.load_image(0).mode == "RGB"


def test_imagefolder_readable_names_from_json_list_mapping_or_txt(tmp_path: Path) -> None:
    write_folder(tmp_path / "data")
    as_list, as_map, as_txt = tmp_path / "names.json", tmp_path / "map.json", tmp_path / "names.txt"
    as_list.write_text(json.dumps(["tabby cat", "golden retriever"]))
    as_map.write_text(json.dumps({"n02_golden_retriever": "golden retriever", "n01_tabby_cat": "tabby"}))
    as_txt.write_text("tabby cat\n\ngolden retriever\n")
    assert ImageFolderSource(tmp_path / "data", str(as_list)).classnames == ["tabby cat", "golden retriever"]
    assert ImageFolderSource(tmp_path / "data", str(as_map)).classnames == ["tabby", "golden retriever"]
    assert ImageFolderSource(tmp_path / "data", str(as_txt)).captions(3) == ["golden retriever"]
    as_txt.write_text("only one\n")
    with pytest.raises(ValueError, match=r"names.txt' lists 1 names but the data has 2 classes; expected one name"):
        ImageFolderSource(tmp_path / "data", str(as_txt))


def test_imagefolder_corrupt_image_raises_image_load_error(tmp_path: Path) -> None:
    write_folder(tmp_path)
    (tmp_path / "n01_tabby_cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageLoadError, match=r"1.png"):
        ImageFolderSource(tmp_path).load_image(1)


def test_imagefolder_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder '.*missing' does not exist; expected a folder with one sub"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty has sub-folders \['cats'\] and no images in them; expected"):
        ImageFolderSource(tmp_path / "empty")
    write_folder(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match=r"classnames='nope' is neither a file nor a shipped list"):
        ImageFolderSource(tmp_path / "ok", "nope")


# ----------------------------------------------------------------------------------------------
# IDX (MNIST family)
# ----------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_images_and_labels_beside_them(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    source = build_source(DataConfig(kind="idx", path=str(tmp_path / f"t10k-images-idx3-ubyte{suffix}")))
    assert len(source) == 7 and source.labels.tolist() == labels.tolist()
    assert source.classnames == [str(d) for d in range(10)] and source.captions(5) == ["9"]
    image = source.load_image(2)
    assert image.mode == "RGB" and image.size == (28, 28)
    assert (np.asarray(image) == images[2][:, :, None]).all()  # grey copied into all three channels


def test_idx_fashion_mnist_shipped_names(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 4, 4)), True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 9]), True)
    assert "fashion-mnist" in shipped_classnames()
    source = read_idx(tmp_path / "train-images-idx3-ubyte.gz", "fashion-mnist")
    assert source.classnames[0] == "T-shirt/top" and source.captions(1) == ["Ankle boot"]


def test_idx_errors_name_the_file_and_expectation(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)), False)
    with pytest.raises(FileNotFoundError, match=r"no labels file beside .*train-images-idx3-ubyte: looked for .*"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1]), False)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte is a labels file; data.path must be an MNIST"):
        read_idx(tmp_path / "train-labels-idx1-ubyte")
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(ValueError, match=r"x-images-idx3-ubyte does not start with the IDX header .*found 89 50 4e 47"):
        read_idx(tmp_path / "x-images-idx3-ubyte")
    with pytest.raises(FileNotFoundError, match=r"'.*nothing-idx3-ubyte' does not exist; expected an MNIST"):
        read_idx(tmp_path / "nothing-idx3-ubyte")


# ----------------------------------------------------------------------------------------------
# CIFAR
# ----------------------------------------------------------------------------------------------
def cifar_rows(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, 32, 32, 3) images and their rows in CIFAR's (count, 3072) channel-planar layout."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return images, images.transpose(0, 3, 1, 2).reshape(count, 3072)


def dump(path: Path, value: dict) -> None:
    path.write_bytes(pickle.dumps(value, protocol=2))


def test_cifar10_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    first, first_rows = cifar_rows(3, 0)
    second, second_rows = cifar_rows(2, 1)
    dump(folder / "data_batch_1", {b"data": first_rows, b"labels": [0, 1, 2], b"batch_label": b"1"})
    dump(folder / "data_batch_2", {b"data": second_rows, b"labels": [3, 9], b"batch_label": b"2"})
    test_images, test_rows = cifar_rows(1, 2)
    dump(folder / "test_batch", {b"data": test_rows, b"labels": [8]})
    train = build_source(DataConfig(kind="cifar", path=str(tmp_path)))  # the folder holding it works too
    assert len(train) == 5 and train.labels.tolist() == [0, 1, 2, 3, 9] and train.captions(4) == ["truck"]
    assert (np.asarray(train.load_image(3)) == second[0]).all()
    test = read_cifar(folder, "test")
    assert len(test) == 1 and test.captions(0) == ["ship"] and (np.asarray(test.load_image(0)) == test_images[0]).all()
    with pytest.raises(ValueError, match=r"split='val' does not exist; the splits present are \['train', 'test'\]"):
        read_cifar(folder, "val")


def test_cifar100_fine_labels_and_readable_names(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    dump(folder / "meta", {b"fine_label_names": [b"apple", b"aquarium_fish"], b"coarse_label_names": [b"x"]})
    images, rows = cifar_rows(2, 3)
    dump(folder / "train", {b"data": rows, b"fine_labels": [1, 0], b"coarse_labels": [0, 0]})
    source = read_cifar(folder, "train")
    assert source.classnames == ["apple", "aquarium fish"] and source.captions(0) == ["aquarium fish"]
    assert (np.asarray(source.load_image(1)) == images[1]).all()
    with pytest.raises(FileNotFoundError, match=r"'.*cifar-100-python/test' does not exist; expected the cifar-10"):
        read_cifar(folder, "test")


def test_cifar_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"folder '.*nope' does not exist; expected the cifar-10-batches-py"):
        read_cifar(tmp_path / "nope")
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has neither batches.meta nor meta \(found \['data_batch_1'\]\)"):
        read_cifar(tmp_path)
