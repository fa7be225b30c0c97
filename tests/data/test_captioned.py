"""COCO and Flickr sources, each read from tiny files the test writes in the real formats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.config import DataConfig
from clipforge.data.base import ImageLoadError, ImageTextSource
from clipforge.data.captioned import CaptionedImageSource, read_coco, read_flickr
from clipforge.data.loader import ImageTextDataset
from clipforge.data.samples import Collator, SkippedSample
from clipforge.data.sources import build_source
from clipforge.data.tokenize import train_bpe_tokenizer
from tests.conftest import processor_for


def write_image(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def captions_of(number: int) -> list[str]:
    return [f"picture {number} caption {k}" for k in range(5)]


# ----------------------------------------------------------------------------------------------
# MS-COCO
# ----------------------------------------------------------------------------------------------
def write_coco(root: Path) -> Path:
    """The COCO 2017 layout: annotations/captions_train2017.json and train2017/*.jpg, 3 images x 5 captions."""
    images = [{"id": 100 + i, "file_name": f"{i:012d}.jpg", "height": 8, "width": 8} for i in range(3)]
    # annotations are not grouped by image in the real files: interleave them
    annotations = [
        {"id": 1000 + 10 * k + i, "image_id": 100 + i, "caption": f" {captions_of(i)[k]}\n"}
        for k in range(5)
        for i in range(3)
    ]
    annotations.append({"id": 9999, "image_id": 555, "caption": "an image that is not listed"})
    for entry in images:
        write_image(root / "train2017" / entry["file_name"])
    path = root / "annotations" / "captions_train2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return path


def test_coco_groups_five_captions_per_image_and_finds_the_image_folder(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    source = build_source(DataConfig(kind="coco", path=str(path)))
    assert isinstance(source, ImageTextSource) and isinstance(source, CaptionedImageSource)
    assert len(source) == 3 and source.num_captions == 15 and source.orphan_captions == 1
    assert source.caption_offsets.tolist() == [0, 5, 10, 15]
    for i in range(3):
        assert source.captions(i) == captions_of(i)
    assert source.root == tmp_path / "train2017"
    assert source.load_image(1).size == (8, 8) and source.describe(1).endswith("000000000001.jpg")
    assert source.labels is None and source.classnames is None


def test_coco_missing_and_corrupt_images_raise_image_load_error_and_are_skipped(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    (tmp_path / "train2017" / "000000000000.jpg").unlink()
    (tmp_path / "train2017" / "000000000002.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    source = read_coco(path)
    with pytest.raises(ImageLoadError, match="000000000000.jpg: image file is missing"):
        source.load_image(0)
    with pytest.raises(ImageLoadError, match="000000000002.jpg"):
        source.load_image(2)
    dataset = ImageTextDataset(source, lambda image: __import__("torch").zeros(3, 4, 4))
    samples = [dataset[(i, 0)] for i in range(3)]
    assert [isinstance(s, SkippedSample) for s in samples] == [True, False, True]
    batch = Collator(processor_for(train_bpe_tokenizer(captions_of(1), vocab_size=270), 8))(samples)
    assert len(batch) == 1 and len(batch.skipped) == 2  # counted, not fatal


def test_coco_image_root_that_holds_none_of_the_images_fails_at_start(tmp_path: Path) -> None:
    path = write_coco(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of 3 images listed in .*captions_train2017.json.*image_root"):
        read_coco(path, image_root=str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*image_root"):
        read_coco(path, image_root=str(tmp_path / "nowhere"))


def test_coco_errors_name_the_file_and_what_fits(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*captions_val2017.json' does not exist; expected an MS-COCO"):
        read_coco(tmp_path / "captions_val2017.json")
    no_annotations = tmp_path / "a.json"
    no_annotations.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}]}))
    with pytest.raises(ValueError, match=r"a.json has no list \['annotations'\] \(found keys \['images'\]\); expected"):
        read_coco(no_annotations)
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "train", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"dataset_coco.json is a Karpathy split file.*use data.kind='flickr'"):
        read_coco(karpathy)
    instances = tmp_path / "instances_train2017.json"
    instances.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match=r"instances_train2017.json has annotations without 'caption' \(an instances"):
        read_coco(instances)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON .*expected an MS-COCO captions file"):
        read_coco(broken)


# ----------------------------------------------------------------------------------------------
# Karpathy split JSON
# ----------------------------------------------------------------------------------------------
SPLITS = ["train", "train", "val", "test", "restval", "train"]


def write_karpathy(root: Path, with_filepath: bool = False) -> Path:
    images = []
    for i, split in enumerate(SPLITS):
        entry = {
            "filename": f"{i}.jpg",
            "imgid": i,
            "split": split,
            "sentids": list(range(5 * i, 5 * i + 5)),
            "sentences": [
                {"tokens": text.split(), "raw": text, "imgid": i, "sentid": 5 * i + k}
                for k, text in enumerate(captions_of(i))
            ],
        }
        if with_filepath:
            entry["filepath"] = "val2014" if i % 2 else "train2014"
        images.append(entry)
        write_image(root / "images" / entry.get("filepath", "") / f"{i}.jpg")
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", [0, 1, 5]), ("val", [2]), ("test", [3]), ("train+restval", [0, 1, 4, 5]), ("all", [0, 1, 2, 3, 4, 5])],
)
def test_karpathy_json_selects_splits(tmp_path: Path, split: str, expected: list[int]) -> None:
    source = read_flickr(write_karpathy(tmp_path), split=split)
    assert [source.describe(i).rsplit("/", 1)[1] for i in range(len(source))] == [f"{i}.jpg" for i in expected]
    assert [source.captions(i) for i in range(len(source))] == [captions_of(i) for i in expected]
    assert source.root == tmp_path / "images"


def test_karpathy_coco_file_joins_filepath(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path, with_filepath=True)
    source = read_flickr(path, image_root=str(tmp_path / "images"), split="val")
    assert source.describe(0).endswith("images/train2014/2.jpg") and source.load_image(0).size == (8, 8)


def test_karpathy_unknown_split_lists_the_splits_present(tmp_path: Path) -> None:
    path = write_karpathy(tmp_path)
    with pytest.raises(ValueError, match=r"no image in split \['validation'\]; the splits present are "):
        read_flickr(path, split="validation")
    with pytest.raises(ValueError, match=r"\['restval', 'test', 'train', 'val', 'all'\]"):
        read_flickr(path, split="validation")


def test_flickr_given_a_coco_captions_file_points_to_coco(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"captions_train2017.json is an MS-COCO captions file.*data.kind='coco'"):
        read_flickr(write_coco(tmp_path))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"data": []}))
    with pytest.raises(ValueError, match=r"odd.json is not a Karpathy split file \(found \['data'\]\); expected"):
        read_flickr(odd)


# ----------------------------------------------------------------------------------------------
# Flickr8k.token.txt and captions.txt
# ----------------------------------------------------------------------------------------------
def write_flickr8k_text(root: Path, names: list[str]) -> Path:
    lines = [f"{name}#{k}\t{text}" for i, name in enumerate(names) for k, text in enumerate(captions_of(i))]
    for name in names:
        write_image(root / "Flicker8k_Dataset" / name)
    path = root / "Flickr8k.token.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_flickr8k_token_file_uses_the_official_split_lists(tmp_path: Path) -> None:
    names = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]
    path = write_flickr8k_text(tmp_path, names)
    (tmp_path / "Flickr_8k.trainImages.txt").write_text(f"{names[0]}\n{names[2]}\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text(f"{names[1]}\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("")
    train = build_source(DataConfig(kind="flickr", path=str(path)))
    assert len(train) == 2 and train.captions(1) == captions_of(2) and train.root == tmp_path / "Flicker8k_Dataset"
    val = read_flickr(path, split="val")
    assert len(val) == 1 and val.captions(0) == captions_of(1) and val.load_image(0).mode == "RGB"
    assert len(read_flickr(path, split="all")) == 3
    with pytest.raises(
        ValueError, match=r"no image in split \['test'\]; the splits present are \['train', 'val', 'all'\]"
    ):
        read_flickr(path, split="test")


def test_plain_caption_files_without_split_lists_only_have_all(tmp_path: Path) -> None:
    path = write_flickr8k_text(tmp_path, ["a.jpg", "b.jpg"])
    with pytest.raises(ValueError, match=r"Flickr8k.token.txt carries no split.*\['all'\].*data.split=all"):
        read_flickr(path)
    assert len(read_flickr(path, split="all")) == 2


def test_kaggle_captions_csv(tmp_path: Path) -> None:
    path = tmp_path / "captions.txt"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(["x.jpg", "y.jpg"]):
            for text in captions_of(i):
                writer.writerow([name, text + ", with a comma"])
            write_image(tmp_path / "Images" / name)
    source = read_flickr(path, split="all")
    assert len(source) == 2 and source.captions(1) == [t + ", with a comma" for t in captions_of(1)]
    assert source.root == tmp_path / "Images" and np.asarray(source.load_image(0)).shape == (8, 8, 3)


def test_flickr_errors_name_the_file_and_the_formats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*Flickr8k.token.txt' does not exist; expected a Karpathy"):
        read_flickr(tmp_path / "Flickr8k.token.txt")
    with pytest.raises(FileNotFoundError, match=r"is a folder; expected a Karpathy split JSON"):
        read_flickr(tmp_path)
    odd = tmp_path / "notes.txt"
    odd.write_text("just some words\n")
    with pytest.raises(ValueError, match=r"notes.txt starts with 'just some words'; expected a Karpathy.*captions.txt"):
        read_flickr(odd)
