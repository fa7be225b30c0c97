"""Bad data fails safely: no code run from a data file, no giant image decoded, and every user mistake in the
data is one line on stderr with exit code 2 (never a traceback), naming the file and the fix."""

from __future__ import annotations

import json
import logging
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipforge.cli import main
from clipforge.config import AugmentConfig, ConfigError, DataConfig, config_from_dict, config_to_dict
from clipforge.data.base import MAX_IMAGE_PIXELS, DataError, ImageTooLargeError, decode_image
from clipforge.data.classification import read_cifar
from clipforge.data.loader import ImageTextDataset, LoaderSpec, build_train_loader
from clipforge.data.manifest import ManifestColumns, ManifestSource
from clipforge.data.samples import SkippedSample
from clipforge.data.shards import ShardSource
from clipforge.data.sources import build_source
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.data.transforms import ImagePreprocess, build_image_transform
from tests.conftest import processor_for, tiny_config

TRANSFORM = build_image_transform(ImagePreprocess(16, (0.5,) * 3, (0.5,) * 3, "bilinear"), AugmentConfig())


def assert_one_line_error(capsys: pytest.CaptureFixture, command: str, *fragments: str) -> str:
    """The command's stderr holds ``clipforge <command>: error: ...`` with every fragment, and no traceback."""
    error = capsys.readouterr().err
    assert "Traceback" not in error, error
    lines = [line for line in error.splitlines() if line.startswith(f"clipforge {command}: error: ")]
    assert len(lines) == 1, error
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# A data file never runs code: CIFAR batches are read with a restricted unpickler
# ----------------------------------------------------------------------------------------------
def write_cifar10(folder: Path, batch: bytes) -> Path:
    """A cifar-10-batches-py folder with a sound batches.meta and test_batch, and ``batch`` as data_batch_1."""
    folder.mkdir(parents=True)
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": rows, b"labels": [0, 1]}, protocol=2))
    (folder / "data_batch_1").write_bytes(batch)
    return folder


def calling_pickle(module: str, name: str, argument: str) -> bytes:
    """A protocol-0 pickle that calls ``module.name(argument)`` when loaded, as a booby-trapped file would."""
    return f"c{module}\n{name}\n(V{argument}\ntR.".encode()


def test_a_cifar_pickle_that_calls_a_function_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "the-pickle-ran"
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", calling_pickle("os", "mkdir", str(marker)))
    with pytest.raises(DataError) as error:
        read_cifar(folder)
    message = str(error.value)
    assert "data_batch_1" in message and "refuses to load 'os.mkdir'" in message
    assert "CIFAR batches hold only arrays, lists and strings" in message
    assert not marker.exists(), "the pickle's call ran"
    assert len(read_cifar(folder, "test")) == 2  # the sound files of the folder still read


def test_the_cifar_command_line_refusal_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "the-pickle-ran"
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", calling_pickle("os", "mkdir", str(marker)))
    assert main(["data", "inspect", "kind=cifar", f"path={folder}"]) == 2
    assert_one_line_error(capsys, "data", "refuses to load 'os.mkdir'", "data_batch_1")
    assert not marker.exists()


def test_cifar_batches_from_numpy_1_still_load_and_garbage_is_named(tmp_path: Path) -> None:
    rows = np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)
    written = pickle.dumps({b"data": rows, b"labels": [3, 4, 5]}, protocol=2)
    # the real CIFAR files were pickled by NumPy 1, whose array reconstructor lives in numpy.core.multiarray
    numpy_1 = written.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in numpy_1
    source = read_cifar(write_cifar10(tmp_path / "a" / "cifar-10-batches-py", numpy_1))
    assert source.labels.tolist() == [3, 4, 5]
    assert np.asarray(source.load_image(2)).reshape(-1)[0] == rows[2, 0]
    with pytest.raises(DataError, match=r"data_batch_1 is not a readable CIFAR python pickle"):
        read_cifar(write_cifar10(tmp_path / "b" / "cifar-10-batches-py", b"not a pickle at all"))


# ----------------------------------------------------------------------------------------------
# Images larger than MAX_IMAGE_PIXELS are refused from their header, and skipped and counted
# ----------------------------------------------------------------------------------------------
def blank_one_bit_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG, written by hand: a few kB on disk, however many pixels it declares."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    rows = b"\0" * (height * (1 + (width + 7) // 8))  # each row: filter byte 0, then the packed bits
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_limit_is_refused_naming_its_size(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(blank_one_bit_png(8000, 6000))  # 48 megapixels > 40
    assert 8000 * 6000 > MAX_IMAGE_PIXELS and path.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError) as error:
        decode_image(path)
    message = str(error.value)
    assert "huge.png" in message and "8000x6000" in message and f"{MAX_IMAGE_PIXELS:,}" in message
    with pytest.raises(ImageTooLargeError, match="8000x6000"):
        decode_image(path.read_bytes())
    assert decode_image(blank_one_bit_png(100, 50)).size == (100, 50)  # the same kind of file, small: fine


def test_an_oversized_image_is_skipped_and_counted_in_training(tmp_path: Path) -> None:
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "huge.png").write_bytes(blank_one_bit_png(8000, 6000))
    (tmp_path / "m.csv").write_text("image,caption\nred.png,a red square\nhuge.png,a black void\n")
    source = ManifestSource(tmp_path / "m.csv")
    skipped = ImageTextDataset(source, TRANSFORM)[(1, 0)]
    assert isinstance(skipped, SkippedSample) and skipped.where.endswith("huge.png")
    assert "8000x6000" in skipped.reason
    tokenizer = train_bpe_tokenizer(["a red square", "a black void"], vocab_size=270)
    spec = LoaderSpec(processor_for(tokenizer, 16, 16), AugmentConfig(), 2, seed=0)
    batch = next(iter(build_train_loader(source, spec)))
    assert len(batch) == 1 and len(batch.skipped) == 1 and "8000x6000" in batch.skipped[0].reason


# ----------------------------------------------------------------------------------------------
# Manifests: configured column names, reported row drops, DataError for every data mistake
# ----------------------------------------------------------------------------------------------
def test_manifest_columns_follow_the_configured_names(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,text,kind\na.png,a cat,cat\nb.png,a dog,dog\n")
    columns = {"image_column": "file", "caption_column": "text", "label_column": "kind"}
    source = build_source(DataConfig(kind="manifest", path=str(tmp_path / "m.csv"), **columns))
    assert source.describe(1).endswith("b.png") and source.captions(0) == ["a cat"]
    assert source.classnames == ["cat", "dog"]
    rows = [{"file": "a.png", "text": "one"}, {"file": "b.png", "texts": ["two", "three"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    source = build_source(DataConfig(kind="manifest", path=str(tmp_path / "m.jsonl"), **columns))
    assert [source.captions(i) for i in range(2)] == [["one"], ["two", "three"]]
    with pytest.raises(DataError) as error:
        ManifestSource(tmp_path / "m.csv", ManifestColumns("path", "sentence"))
    message = str(error.value)
    assert "'path' and 'sentence'" in message and "['file', 'text', 'kind']" in message
    assert "data.image_column" in message


def test_dropped_rows_are_reported_once_with_their_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "m.csv").write_text("image,caption\na.png,\nb.png,fine\n,no image\nc.png,  \nd.png,also fine\n")
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        source = ManifestSource(tmp_path / "m.csv")
    assert source.skipped_rows == 3 and len(source) == 2
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "m.csv" in warnings[0] and "skipped 3 of 5 rows" in warnings[0] and "lines 2, 4, 5" in warnings[0]


def test_data_mistakes_in_manifests_are_data_errors(tmp_path: Path) -> None:
    for name, text, message in [
        ("cols.csv", "file,caption\na.png,x\n", "needs the columns 'image' and 'caption'"),
        ("header.csv", "image,caption\n", "is empty"),
        ("label.csv", "image,caption,label\na.png,x,\n", "line 2: empty 'label'"),
        ("bad.jsonl", '{"image": "a.png", "caption": "x"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("m.parquet", "image,caption\n", "unknown extension"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            ManifestSource(tmp_path / name)


def test_a_manifest_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes("image,caption\na.png,a cat\nb.png,un caf\xe9 noir\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"m\.csv, line 3: not UTF-8 text \(byte 0xe9 at column 13\)"):
        ManifestSource(tmp_path / "m.csv")
    (tmp_path / "m.jsonl").write_bytes(b'{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl, line 1: not UTF-8 text"):
        ManifestSource(tmp_path / "m.jsonl")


# ----------------------------------------------------------------------------------------------
# Through the command line: exit code 2, one line, the file named, nothing written
# ----------------------------------------------------------------------------------------------
def write_run_config(tmp_path: Path, data: dict) -> tuple[Path, Path]:
    """(config file, output folder) of a tiny run on ``data``."""
    output_dir = tmp_path / "run"
    values = config_to_dict(tiny_config(tmp_path / "unused.csv", output_dir))
    values["data"] = data
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path, output_dir


def assert_nothing_written(output_dir: Path) -> None:
    assert not output_dir.exists() or not any(output_dir.iterdir())


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("latin1.csv", "image,caption\na.png,a cat\nb.png,un caf\xe9\n".encode("latin-1"), ["line 3", "not UTF-8"]),
        ("columns.csv", b"file,text\na.png,a cat\n", ["needs the columns 'image' and 'caption'", "['file', 'text']"]),
        ("header.csv", b"image,caption\n", ["is empty"]),
        ("blank.jsonl", b"\n\n", ["is empty"]),
    ],
)
def test_train_on_a_broken_manifest_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes, fragments: list[str]
) -> None:
    (tmp_path / name).write_bytes(content)
    config, output_dir = write_run_config(tmp_path, {"kind": "manifest", "path": str(tmp_path / name)})
    assert main(["train", str(config)]) == 2
    assert_one_line_error(capsys, "train", name, *fragments)
    assert_nothing_written(output_dir)


def test_train_on_a_karpathy_file_as_coco_says_use_flickr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    karpathy = {"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}], "dataset": "x"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    config, output_dir = write_run_config(tmp_path, {"kind": "coco", "path": str(tmp_path / "dataset_coco.json")})
    assert main(["train", str(config)]) == 2
    assert_one_line_error(capsys, "train", "dataset_coco.json is a Karpathy split file", "use data.kind='flickr'")
    assert_nothing_written(output_dir)


def test_train_on_shards_that_are_all_unreadable_names_the_first_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("0.tar", "1.tar"):
        (tmp_path / name).write_bytes(b"garbage" * 200)
    spec = str(tmp_path / "{0,1}.tar")
    with pytest.raises(DataError, match=r"no readable sample in .*: all 2 shards failed \(first: shard .*0\.tar"):
        list(ShardSource(spec).iter_captions())
    config, output_dir = write_run_config(tmp_path, {"kind": "webdataset", "path": spec})
    assert main(["train", str(config)]) == 2
    assert_one_line_error(capsys, "train", "no readable sample in", "all 2 shards failed (first: ")
    assert_nothing_written(output_dir)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
        ("data.cached_views=-2", "data.cached_views=-2 must be >= 0"),
        ("data.shuffle_buffer=-1", "data.shuffle_buffer=-1 must be >= 0"),
        ("data.augment.grayscale=1.5", "data.augment.grayscale=1.5 must lie in [0, 1]: a probability"),
        ("data.augment.low_res=-0.1", "data.augment.low_res=-0.1 must lie in [0, 1]: a probability"),
        ("data.augment.color_jitter=-0.1", "data.augment.color_jitter=-0.1 must lie in [0, 1]: a jitter strength"),
        ("data.augment.scale_min=0", "data.augment.scale_min=0.0 must lie in (0, 1]"),
    ],
)
def test_negative_loader_settings_exit_2(
    shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    data = {"kind": "manifest", "path": str(shapes_manifest)}
    if override.startswith("data.shuffle_buffer"):  # a setting of streamed shards: only webdataset has it
        data = {"kind": "webdataset", "path": str(tmp_path / "{0..1}.tar")}
    config, output_dir = write_run_config(tmp_path, data)
    assert main(["train", str(config), override]) == 2
    assert_one_line_error(capsys, "train", message)
    assert_nothing_written(output_dir)


def test_eval_task_data_is_checked_like_the_training_data(shapes_manifest: Path) -> None:
    task = {"name": "val", "task": "retrieval", "data": {"kind": "manifest", "path": "x.csv", "cached_views": -1}}
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].data.cached_views=-1 must be >= 0"):
        config_from_dict({"eval": {"tasks": [task]}})
    mix = {"kind": "mix", "mix": [{"kind": "emoji"}, {"kind": "webdataset", "path": "s/{0..1}.tar"}]}
    with pytest.raises(ConfigError, match=r"data.mix\[1\].kind='webdataset': a mix draws from map-style sources"):
        config_from_dict({"data": mix})


def test_train_a_recipe_without_its_data_names_the_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no data/flickr8k here
    assert main(["train", "flickr8k", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert_one_line_error(capsys, "train", "'data/flickr8k/dataset_flickr8k.json' does not exist")
    assert_nothing_written(tmp_path / "run")


def test_a_missing_image_root_is_named_before_the_annotations_are_read(tmp_path: Path) -> None:
    (tmp_path / "captions_train2017.json").write_text("{ not even json")
    config = DataConfig(kind="coco", path=str(tmp_path / "captions_train2017.json"), image_root=str(tmp_path / "no"))
    with pytest.raises(FileNotFoundError, match=r"folder '.*no' does not exist; expected data.image_root"):
        build_source(config)


def test_data_inspect_of_a_broken_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.csv").write_text("picture,caption\na.png,x\n")
    assert main(["data", "inspect", "kind=manifest", f"path={tmp_path / 'm.csv'}"]) == 2
    assert_one_line_error(capsys, "data", "m.csv", "needs the columns 'image' and 'caption'", "found ['picture'")
    assert main(["data", "pack", "kind=manifest", f"path={tmp_path / 'm.csv'}", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, "data", "needs the columns")
    assert not (tmp_path / "out").exists()
    assert main(["data", "pack", "kind=emoji", str(tmp_path / "out"), "--shard-size", "0"]) == 2
    assert_one_line_error(capsys, "data", "--shard-size=0 must be a positive number")
