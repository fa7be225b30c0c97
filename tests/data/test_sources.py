"""decode_image on awkward files and ManifestSource on CSV/TSV/JSONL manifests, all written by the tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.data.base import ImageLoadError, ImageTextSource, decode_image
from clipforge.data.manifest import ManifestSource


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ----------------------------------------------------------------------------------------------
# decode_image
# ----------------------------------------------------------------------------------------------
def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = pixels(decode_image(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - 127).max() <= 1


def test_la_is_composited_on_white(tmp_path: Path) -> None:
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)  # transparent black, opaque black
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = pixels(decode_image(str(tmp_path / "la.png")))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, suffix: str) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / f"p.{suffix}", transparency=0)
    out = pixels(decode_image(tmp_path / f"p.{suffix}"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 255]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)  # pure red ink
    with Image.open(tmp_path / "cmyk.jpg") as stored:
        assert stored.mode == "CMYK"
    out = pixels(decode_image(tmp_path / "cmyk.jpg"))
    assert np.abs(out[8, 8] - [255, 0, 0]).max() <= 16


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey16 = np.array([[0, 32768, 65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as stored:
        assert stored.mode in ("I;16", "I")
    out = pixels(decode_image(tmp_path / "g16.png"))
    assert out[0, :, 0].tolist()[0] == 0 and out[0, 2].tolist() == [255, 255, 255]
    assert out[0, 1, 0] in (127, 128) and (out[0, 1] == out[0, 1, 0]).all()  # mid-grey stays mid-grey
    assert out[0, 3, 0] == 10


def test_greyscale_and_one_bit_become_rgb(tmp_path: Path) -> None:
    Image.new("L", (3, 2), 90).save(tmp_path / "l.png")
    Image.new("1", (3, 2), 1).save(tmp_path / "one.png")
    assert pixels(decode_image(tmp_path / "l.png"))[0, 0].tolist() == [90, 90, 90]
    assert pixels(decode_image(tmp_path / "one.png"))[1, 2].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red
    stored[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    image = decode_image(tmp_path / "rot.jpg")
    assert image.size == (20, 40)  # width and height swapped
    out = pixels(image)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # the left (red) edge is now on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60


def test_bytes_are_accepted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (1, 2, 3)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.size == (5, 3) and pixels(image)[0, 0].tolist() == [1, 2, 3]


def test_truncated_jpeg_raises(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"cut\.jpg.*truncated"):
        decode_image(tmp_path / "cut.jpg")


def test_missing_and_non_image_files_raise(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nowhere\.png.*missing"):
        decode_image(tmp_path / "nowhere.png")
    (tmp_path / "notes.jpg").write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg.*not an image"):
        decode_image(tmp_path / "notes.jpg")


# ----------------------------------------------------------------------------------------------
# ManifestSource
# ----------------------------------------------------------------------------------------------
def write_images(folder: Path, colours: dict[str, tuple[int, int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(folder / name)


def test_csv_groups_captions_per_image(tmp_path: Path) -> None:
    write_images(tmp_path / "img", {"a.png": (255, 0, 0), "b.png": (0, 255, 0)})
    (tmp_path / "m.csv").write_text(
        'image,caption\nimg/a.png,a red square\nimg/b.png,"green, and square"\nimg/a.png,  red again  \n\n'
    )
    source = ManifestSource(tmp_path / "m.csv")
    assert isinstance(source, ImageTextSource)
    assert len(source) == 2 and source.num_captions == 3
    assert source.captions(0) == ["a red square", "red again"]
    assert source.captions(1) == ["green, and square"]
    assert source.describe(1) == str(tmp_path / "img" / "b.png")
    assert pixels(source.load_image(1))[0, 0].tolist() == [0, 255, 0]
    assert source.labels is None and source.classnames is None and source.skipped_rows == 0
    assert isinstance(source.caption_offsets, np.ndarray) and source.caption_offsets.tolist() == [0, 2, 3]


@pytest.mark.parametrize("suffix", [".tsv", ".tab"])
def test_tsv_reads_fields_verbatim(tmp_path: Path, suffix: str) -> None:
    write_images(tmp_path, {"a.png": (0, 0, 0)})
    (tmp_path / f"m{suffix}").write_text('caption\timage\na "quoted" word, with a comma\ta.png\n')
    source = ManifestSource(tmp_path / f"m{suffix}")
    assert source.captions(0) == ['a "quoted" word, with a comma']


def test_jsonl_with_caption_lists_and_absolute_paths(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", {"a.png": (0, 0, 255), "b.png": (9, 9, 9)})
    absolute = str(tmp_path / "pics" / "b.png")
    rows = [
        {"image": "pics/a.png", "captions": ["first", "second"]},
        {"image": absolute, "caption": "only one"},
        {"image": "pics/a.png", "captions": ["third", ""]},
    ]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows).replace("pics/a", "../pics/a"))
    source = ManifestSource(tmp_path / "sub" / "m.jsonl")
    assert len(source) == 2
    assert source.captions(0) == ["first", "second", "third"]
    assert source.captions(1) == ["only one"] and source.describe(1) == absolute
    assert pixels(source.load_image(0))[0, 0].tolist() == [0, 0, 255]


def test_string_labels_become_sorted_classnames(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption,label\na.png,x,dog\nb.png,y,cat\na.png,z,dog\nc.png,w,emu\n")
    source = ManifestSource(tmp_path / "m.csv")
    assert source.classnames == ["cat", "dog", "emu"]
    assert source.labels is not None and source.labels.tolist() == [1, 0, 2]


def test_integer_labels_are_kept(tmp_path: Path) -> None:
    rows = [{"image": "a.png", "caption": "x", "label": 3}, {"image": "b.png", "caption": "y", "label": 0}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = ManifestSource(tmp_path / "m.jsonl")
    assert source.labels is not None and source.labels.tolist() == [3, 0] and source.classnames is None


def test_conflicting_labels_for_one_image_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption,label\na.png,x,dog\na.png,y,cat\n")
    with pytest.raises(ValueError, match=r"line 3.*'a\.png'.*'cat'.*'dog'"):
        ManifestSource(tmp_path / "m.csv")


def test_empty_captions_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption\na.png,\nb.png,   \nc.png,fine\n")
    source = ManifestSource(tmp_path / "m.csv")
    assert source.skipped_rows == 2 and len(source) == 1 and source.describe(0).endswith("c.png")
    (tmp_path / "none.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(ValueError, match="all 1 rows were skipped"):
        ManifestSource(tmp_path / "none.csv")


def test_missing_images_fail_only_when_loaded(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption\ngone.png,a caption\n")
    source = ManifestSource(tmp_path / "m.csv")  # construction does not stat the images
    with pytest.raises(ImageLoadError, match=r"gone\.png.*missing"):
        source.load_image(0)


def test_missing_manifest_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.csv"):
        ManifestSource(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    ("text", "found"),
    [("file,caption\na.png,x\n", "['file', 'caption']"), ("image,text\na.png,x\n", "['image', 'text']")],
)
def test_missing_columns_name_file_found_and_expected(tmp_path: Path, text: str, found: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ValueError) as error:
        ManifestSource(tmp_path / "m.csv")
    message = str(error.value)
    assert "m.csv" in message and found in message and "'image' and 'caption'" in message


def test_jsonl_row_without_captions_names_line_and_keys(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{"image": "b.png", "text": "no"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2.*'captions'.*found \['image', 'text'\]"):
        ManifestSource(tmp_path / "m.jsonl")


def test_invalid_jsonl_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        ManifestSource(tmp_path / "m.jsonl")


@pytest.mark.parametrize(("name", "text"), [("m.csv", ""), ("m.csv", "image,caption\n\n"), ("m.jsonl", "\n\n")])
def test_empty_manifest_is_an_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="is empty"):
        ManifestSource(tmp_path / name)


def test_unknown_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "m.parquet").write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"'\.parquet'.*'\.csv'.*'\.jsonl'"):
        ManifestSource(tmp_path / "m.parquet")
