"""The ``hf`` source: a ``datasets`` folder (save_to_disk) and Parquet/Arrow files, written by the test."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.config import DataConfig
from clipforge.data.base import ImageLoadError, ImageTextSource
from clipforge.data.sources import build_source

datasets = pytest.importorskip(
    "datasets", reason="the hf source needs the 'datasets' package: pip install 'clipforge[hf]'"
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def captioned() -> datasets.Dataset:
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "text": datasets.Sequence(datasets.Value("string")),
            "label": datasets.ClassLabel(names=["red", "green", "blue"]),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "img": [Image.new("RGB", (5, 5), colour) for colour in COLOURS] + [None],
            "text": [["a red square", "red"], ["green"], [], ["blue, but no image"]],
            "label": [0, 1, 2, 2],
        },
        features=features,
    )


def test_save_to_disk_folder_with_list_captions_and_class_labels(tmp_path: Path) -> None:
    captioned().save_to_disk(str(tmp_path / "saved"))
    config = DataConfig(kind="hf", path=str(tmp_path / "saved"), image_column="img", caption_column="text")
    source = build_source(config)
    assert isinstance(source, ImageTextSource)
    assert len(source) == 3 and source.skipped_rows == 1  # the row with no caption is left out
    assert source.captions(0) == ["a red square", "red"] and source.captions(2) == ["blue, but no image"]
    assert source.labels.tolist() == [0, 1, 2] and source.classnames == ["red", "green", "blue"]
    assert np.asarray(source.load_image(1))[0, 0].tolist() == [0, 255, 0]
    with pytest.raises(ImageLoadError, match=r"saved row 3: the image cell is empty"):
        source.load_image(2)


def test_dataset_dict_split_and_missing_split(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": captioned(), "test": captioned().select([0])}).save_to_disk(str(tmp_path / "dd"))
    config = DataConfig(kind="hf", path=str(tmp_path / "dd"), split="test", image_column="img", caption_column="text")
    assert len(build_source(config)) == 1
    config.split = "validation"
    with pytest.raises(ValueError, match=r"dd has no split 'validation'; the splits present are \['test', 'train'\]"):
        build_source(config)


def test_parquet_files_by_split_with_string_captions_and_bytes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "data").mkdir()
    for split, rows in (("train", [0, 1]), ("test", [2])):
        table = pa.table(
            {
                "jpg": pa.array([png(COLOURS[i]) for i in rows], type=pa.binary()),
                "caption": [f"colour {i}" for i in rows],
            }
        )
        parquet.write_table(table, tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    source = build_source(DataConfig(kind="hf", path=str(tmp_path), image_column="jpg"))
    assert len(source) == 2 and source.captions(1) == ["colour 1"] and source.labels is None
    assert np.asarray(source.load_image(0))[0, 0].tolist() == [255, 0, 0]
    test = build_source(DataConfig(kind="hf", path=str(tmp_path), image_column="jpg", split="test"))
    assert test.captions(0) == ["colour 2"]
    pattern = build_source(DataConfig(kind="hf", path=str(tmp_path / "data" / "*.parquet"), image_column="jpg"))
    assert len(pattern) == 3  # a glob names its files: no split selection
    with pytest.raises(ValueError, match=r"has no files of split 'val'; the splits present are \['test', 'train'\]"):
        build_source(DataConfig(kind="hf", path=str(tmp_path), image_column="jpg", split="val"))


def test_parquet_written_by_datasets_keeps_class_names_and_label_only_sets(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    data = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))], "label": [1, 0]}, features=features
    )
    data.to_parquet(str(tmp_path / "pets.parquet"))
    source = build_source(DataConfig(kind="hf", path=str(tmp_path / "pets.parquet")))
    assert source.classnames == ["cat", "dog"] and source.captions(0) == ["dog"] and source.labels.tolist() == [1, 0]


def test_hf_errors_name_the_path_and_the_columns(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    with pytest.raises(FileNotFoundError, match=r"'.*nothing' does not exist; expected a datasets folder"):
        build_source(DataConfig(kind="hf", path=str(tmp_path / "nothing")))
    parquet.write_table(pa.table({"picture": [b"x"], "text": ["y"]}), tmp_path / "t.parquet")
    with pytest.raises(
        ValueError, match=r"t.parquet has no image column 'image'; columns found: \['picture', 'text'\]"
    ):
        build_source(DataConfig(kind="hf", path=str(tmp_path / "t.parquet")))
    with pytest.raises(ValueError, match=r"neither the caption column 'caption' nor the label column 'label'"):
        build_source(DataConfig(kind="hf", path=str(tmp_path / "t.parquet"), image_column="picture"))
