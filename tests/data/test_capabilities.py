"""Sources declare what they can do, and every caller asks that (``capabilities_of``) instead of testing a class."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipforge.config import DATA_KINDS, MAP_STYLE, STREAMED, Config, DataConfig, SourceCapabilities
from clipforge.data.base import DataError, capabilities_of
from clipforge.data.inputs import open_image_source
from clipforge.data.loader import build_train_loader
from clipforge.data.loader_spec import LoaderSpec
from clipforge.data.pack import inspect_source
from clipforge.data.sources import build_source, reader_of, training_captions
from clipforge.eval.runner import open_eval_source
from clipforge.train import preflight
from clipforge.train.cache_features import CachePlan, plan_feature_cache
from tests.data.shard_helpers import shapes_samples, write_shards
from tests.data.test_captioned import write_coco, write_karpathy
from tests.data.test_classification import cifar_rows, dump, write_folder, write_idx
from tests.data.test_torchvision_datasets import write_stl10


def write_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    dump(folder / "data_batch_1", {b"data": cifar_rows(2, 0)[1], b"labels": [0, 1]})
    return folder


def write_hf(root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = []
    for colour in ((255, 0, 0), (0, 0, 255)):
        path = root / f"{colour[0]}.png"
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), colour).save(path)
        cells.append(str(path))
    pq.write_table(pa.table({"image": cells, "caption": ["red", "blue"]}), root / "t.parquet")
    return root / "t.parquet"


def sections(tmp_path: Path, shapes_manifest: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """A data section of every kind, over tiny files of its format."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)  # no real MD5 sums
    write_folder(tmp_path / "folder")
    (tmp_path / "idx").mkdir()
    write_idx(tmp_path / "idx" / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), dtype=np.uint8), False)
    write_idx(tmp_path / "idx" / "t10k-labels-idx1-ubyte", np.array([0, 1]), False)
    write_stl10(tmp_path / "stl", [0, 1])
    return {
        "emoji": {"split": "val"},
        "corpus": {"name": "flags", "split": "val"},
        "manifest": {"path": str(shapes_manifest)},
        "coco": {"path": str(write_coco(tmp_path / "coco"))},
        "flickr": {"path": str(write_karpathy(tmp_path / "flickr"))},
        "imagefolder": {"path": str(tmp_path / "folder")},
        "idx": {"path": str(tmp_path / "idx" / "t10k-images-idx3-ubyte")},
        "cifar": {"path": str(write_cifar(tmp_path / "cifar"))},
        "hf": {"path": str(write_hf(tmp_path / "hf"))},
        "torchvision": {"name": "STL10", "path": str(tmp_path / "stl"), "split": "test"},
        "webdataset": {"path": write_shards(tmp_path / "shards", shapes_samples()[:6], shard_size=3)},
        "mix": {"mix": [DataConfig(kind="emoji", split="val"), DataConfig(kind="manifest", path=str(shapes_manifest))]},
    }


def test_every_kind_builds_a_source_that_declares_its_kinds_capabilities(
    tmp_path: Path, shapes_manifest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = sections(tmp_path, shapes_manifest, monkeypatch)
    assert set(built) == set(DATA_KINDS)
    for kind, fields in built.items():
        config = DataConfig(kind=kind, **fields)
        assert reader_of(config).__module__.startswith("clipforge.data."), kind
        source = build_source(config)
        capabilities = capabilities_of(source)
        assert capabilities == config.capabilities, kind
        if capabilities.random_access:
            assert len(source) > 0 and source.captions(0)
            if not capabilities.labels:
                assert source.labels is None, kind
        if capabilities.streaming:
            assert next(iter(source.iter_captions()))


class Listed:
    """A map-style source of coloured squares that declares ``capabilities`` as given."""

    labels = None
    classnames = None

    def __init__(self, capabilities: SourceCapabilities | None = None, count: int = 4) -> None:
        if capabilities is not None:
            self.capabilities = capabilities
        self.count = count

    def __len__(self) -> int:
        return self.count

    def load_image(self, index: int) -> Image.Image:
        return Image.new("RGB", (8, 8), (index * 40, 0, 0))

    def captions(self, index: int) -> list[str]:
        return [f"square {index}"]

    def describe(self, index: int) -> str:
        return f"square {index}"


class Stream:
    """A streamed source with no length and no index at all: any use of one would raise."""

    capabilities = STREAMED
    shards = ["a.tar"]

    def __len__(self) -> int:
        raise AssertionError("a streamed source was asked its length")

    def iter_captions(self):
        yield from ("a red circle", "a blue square")


def test_a_source_that_declares_nothing_is_map_style_and_a_wrapper_keeps_what_it_wraps() -> None:
    assert capabilities_of(Listed()) == MAP_STYLE
    templated = build_source(DataConfig(kind="emoji", split="val", caption_templates=["a {}"]))
    assert capabilities_of(templated) == MAP_STYLE == DATA_KINDS["emoji"].capabilities
    assert capabilities_of(pickle.loads(pickle.dumps(templated))) == MAP_STYLE


def test_the_tokenizer_captions_come_by_index_or_from_the_stream() -> None:
    assert training_captions(Listed(count=2)) == ["square 0", "square 1"]
    assert training_captions(Stream()) == ["a red circle", "a blue square"]


def test_the_start_up_checks_skip_a_source_without_random_access() -> None:
    data = DataConfig(kind="webdataset", path="s.tar")
    preflight.check_batch_fits(Stream(), data, batch_size=64, world_size=1)
    preflight.check_images_decode(Stream(), data)
    with pytest.raises(Exception, match="larger than the 4 images"):
        preflight.check_batch_fits(Listed(), DataConfig(kind="manifest", path="m.csv"), 8, 1)


def test_the_loader_and_the_feature_cache_ask_whether_a_source_can_be_cached() -> None:
    uncacheable = Listed(replace(MAP_STYLE, cacheable=False))
    spec = LoaderSpec(lambda image: image, None, 8, 2, 0)
    with pytest.raises(DataError, match="set data.cache_features=false"):
        build_train_loader(uncacheable, spec, cached_features=object())
    assert plan_feature_cache(Config(), model=None, source=uncacheable) == CachePlan()
    with pytest.raises(DataError, match="neither random access nor a stream"):
        build_train_loader(Listed(replace(MAP_STYLE, random_access=False)), spec)


def test_evaluation_and_packing_ask_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("clipforge.eval.runner.build_source", lambda data: Listed(replace(MAP_STYLE, evaluable=False)))
    with pytest.raises(DataError, match="evaluation cannot index"):
        open_eval_source(DataConfig(kind="manifest", path="m.csv"))
    monkeypatch.setattr("clipforge.data.pack.build_source", lambda data: Listed(replace(MAP_STYLE, packable=False)))
    with pytest.raises(DataError, match="cannot be packed"):
        inspect_source(DataConfig(kind="manifest", path="m.csv"))


def test_embed_indexes_the_shards_of_a_webdataset_data_config(tmp_path: Path) -> None:
    spec = write_shards(tmp_path / "shards", shapes_samples()[:5], shard_size=2)
    (tmp_path / "data.yaml").write_text(f"data: {{kind: webdataset, path: '{spec}'}}\n")
    source = open_image_source(tmp_path / "data.yaml")
    assert capabilities_of(source).random_access and len(source) == 5
    assert source.describe(0).endswith(".tar:" + source.captions(0)[0])
    assert source.load_image(4).mode == "RGB"
