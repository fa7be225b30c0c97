"""WebDataset shards: reading img2dataset's layout, skipping bad data, exact resume, rank splits, resampling."""

import io
import json
import logging
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.config import AugmentConfig, ConfigError, data_config_from_dict
from clipforge.data.base import decode_image
from clipforge.data.loader import LoaderSpec, build_train_loader
from clipforge.data.shards import ShardSource, expand_shards
from clipforge.data.sources import build_source
from clipforge.data.streaming import ShardStream, shuffle_buffer
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.data.transforms import ImagePreprocess, build_image_transform
from tests.conftest import processor_for
from tests.data.shard_helpers import shapes_samples, write_shards

TRANSFORM = build_image_transform(
    ImagePreprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"), AugmentConfig(scale_min=0.5)
)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def batches(source: ShardSource, start: int, count: int, workers: int = 0, streams: int | None = None, **kwargs):
    tokenizer = train_bpe_tokenizer(list(source.iter_captions()), vocab_size=300)
    spec = LoaderSpec(
        processor_for(tokenizer, 16, 16),
        AugmentConfig(scale_min=0.5),
        4,
        seed=5,
        start_sample=start,
        num_workers=workers,
        streams=streams,
        **kwargs,
    )
    loader = build_train_loader(source, spec)
    return list(islice(iter(loader), count))


def assert_same_batches(expected, got) -> None:
    assert len(expected) == len(got)
    for first, second in zip(expected, got, strict=True):
        assert torch.equal(first.images, second.images)
        assert torch.equal(first.input_ids, second.input_ids)
        assert [s.where for s in first.skipped] == [s.where for s in second.skipped]


def epoch_keys(stream: ShardStream, slot: int, epoch: int = 0) -> list[str]:
    keys = []
    for seen_epoch, _, ref in stream.slot_stream(slot):
        if seen_epoch > epoch:
            return keys
        if seen_epoch == epoch:
            keys.append(ref.key)
    raise AssertionError("unreachable: the stream is endless")


def test_brace_notation_expands_to_the_shard_list() -> None:
    assert expand_shards("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_shards("a/{x,y}.tar::b.tar") == ["a/x.tar", "a/y.tar", "b.tar"]


@pytest.mark.parametrize("writer", ["tarfile", "webdataset"])
def test_reads_img2dataset_layout(tmp_path: Path, writer: str) -> None:
    samples = shapes_samples()
    source = build_source(
        data_config_from_dict({"kind": "webdataset", "path": write_shards(tmp_path, samples, 5, writer)})
    )
    assert isinstance(source, ShardSource) and len(source.shards) == 5
    assert [source.count(shard) for shard in range(5)] == [5, 5, 5, 5, 4]
    read = list(source.iter_samples())
    assert [s.captions for s in read] == [[s["caption"]] for s in samples]  # from .txt, or from the .json alone
    assert [s.label for s in read] == [s["label"] for s in samples]
    assert not any(s.problem for s in read)
    assert np.array_equal(np.asarray(decode_image(read[7].image)), np.asarray(decode_image(samples[7]["jpg"])))
    assert list(source.iter_captions()) == [s["caption"] for s in samples]


def test_caption_and_label_members(tmp_path: Path) -> None:
    jpeg = shapes_samples()[0]["jpg"]
    meta = {"caption": "ignored: the list wins", "captions": ["one", "two"]}
    path = write_tar(
        tmp_path / "x.tar",
        [("a.JPG", jpeg), ("a.txt", b"txt caption"), ("a.json", json.dumps(meta).encode())]
        + [("dir/b.seg.webp", b"..."), ("dir/b.txt", b"  spaced  "), ("dir/b.cls", b"3")],
    )
    first, second = ShardSource(str(path)).iter_samples()
    assert first.captions == ["one", "two"] and first.image == jpeg and first.image_extension == "jpg"
    assert second.where.endswith("x.tar:dir/b") and second.captions == ["spaced"] and second.label == 3


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    good = shapes_samples()
    members = [[(f"{i}.jpg", good[i]["jpg"]), (f"{i}.txt", b"a caption")] for i in range(8)]
    members[1][0] = ("1.jpg", b"not a jpeg at all")
    members[5] = [("5.txt", b"a caption without an image")]
    members[6] = [("6.jpg", good[6]["jpg"]), ("6.json", b'{"status": "success"}')]  # no caption
    write_tar(tmp_path / "00000.tar", [m for sample in members[:4] for m in sample])
    write_tar(tmp_path / "00001.tar", [m for sample in members[4:] for m in sample])
    source = ShardSource(str(tmp_path / "{00000..00001}.tar"), shuffle_buffer=0)
    first, second = batches(source, 0, 2, streams=1)  # one epoch: each shard in file order (no shuffle buffer)
    assert sorted([len(first), len(second)]) == [2, 3]
    skipped = {s.where.rsplit(":", 1)[1]: s.reason for s in first.skipped + second.skipped}
    assert sorted(skipped) == ["1", "5", "6"]
    assert "corrupt" in skipped["1"] or "identify" in skipped["1"]
    assert "no image" in skipped["5"] and "no caption" in skipped["6"]


def test_unreadable_shards_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = shapes_samples()
    write_shards(tmp_path / "good", samples[:4], 4)
    good = (tmp_path / "good" / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(good)
    # 00001.tar is missing
    (tmp_path / "00002.tar").write_bytes(b"this is no tar file" * 100)
    (tmp_path / "00003.tar").write_bytes(good[: len(good) * 3 // 5])  # truncated mid-way
    corrupt = bytearray(good)
    third = good.index(f"{samples[2]['key']}.jpg".encode())  # the first header of the third sample
    corrupt[third : third + 100] = b"x" * 100
    (tmp_path / "00004.tar").write_bytes(bytes(corrupt))
    source = ShardSource(str(tmp_path / "{00000..00004}.tar"))
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        counts = [source.count(shard) for shard in range(5)]
        source.scan(1)  # a second look warns no more
    assert counts[:3] == [4, 0, 0] and 1 <= counts[3] < 4 and counts[4] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4
    for name in ("00001.tar", "00002.tar", "00003.tar", "00004.tar"):
        assert sum(name in message for message in warnings) == 1, (name, warnings)
    assert "missing" in warnings[0]
    read = list(source.iter_samples())
    assert len(read) == sum(counts) and not any(s.problem for s in read)  # what was kept is whole


def test_a_stream_with_no_readable_shard_fails_clearly(tmp_path: Path) -> None:
    for name in ("0.tar", "1.tar"):
        (tmp_path / name).write_bytes(b"garbage" * 200)
    stream = ShardStream(ShardSource(str(tmp_path / "{0,1}.tar")), TRANSFORM, 4, seed=0)
    with pytest.raises(RuntimeError, match="no readable sample"):
        next(iter(stream))


@pytest.mark.parametrize(("first_workers", "resumed_workers"), [(0, 0), (2, 2), (2, 0)])
def test_resume_mid_epoch_matches_the_uninterrupted_stream(
    tmp_path: Path, first_workers: int, resumed_workers: int
) -> None:
    source = ShardSource(write_shards(tmp_path, shapes_samples(), 5), shuffle_buffer=6)
    full = batches(source, 0, 9, workers=first_workers)  # 36 samples: every slot crosses into epoch 1
    streams = max(1, first_workers)  # the layout the trainer keeps in its checkpoint
    resumed = batches(source, 3 * 4, 6, workers=resumed_workers, streams=streams)
    assert_same_batches(full[3:], resumed)
    assert not torch.equal(full[0].images, full[1].images)


def test_epochs_are_shuffled_and_cover_every_sample(tmp_path: Path) -> None:
    source = ShardSource(write_shards(tmp_path, shapes_samples(), 4), shuffle_buffer=5)
    stream = ShardStream(source, TRANSFORM, 4, seed=1)
    first, second = epoch_keys(stream, 0, 0), epoch_keys(stream, 0, 1)
    assert sorted(first) == sorted(second) == [s["key"] for s in shapes_samples()]
    assert first != second and first != sorted(first)


@pytest.mark.parametrize("streams", [1, 2])
def test_ranks_see_disjoint_parts_of_every_epoch(tmp_path: Path, streams: int) -> None:
    source = ShardSource(write_shards(tmp_path, shapes_samples(), 4), shuffle_buffer=3)  # 6 shards
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            stream = ShardStream(source, TRANSFORM, 4, seed=2, rank=rank, world_size=2, streams=streams)
            per_rank.append([key for s in range(streams) for key in epoch_keys(stream, rank * streams + s, epoch)])
        zero, one = (set(keys) for keys in per_rank)
        assert len(zero) == len(per_rank[0]) and len(one) == len(per_rank[1])  # no sample twice in a rank
        assert not zero & one and zero | one == {s["key"] for s in shapes_samples()}


def test_too_few_shards_for_ranks_and_workers_is_explained(tmp_path: Path) -> None:
    source = ShardSource(write_shards(tmp_path, shapes_samples(), 8))  # 3 shards
    with pytest.raises(ValueError, match="3 shards cannot be split over world_size=2 x 2"):
        ShardStream(source, TRANSFORM, 4, seed=0, rank=0, world_size=2, streams=2)


def test_resampling_has_the_declared_epoch_size_and_resumes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epoch_size"):
        data_config_from_dict({"kind": "webdataset", "path": "x.tar", "resample": True})
    spec = write_shards(tmp_path, shapes_samples(), 4)
    config = data_config_from_dict({"kind": "webdataset", "path": spec, "resample": True, "epoch_size": 12})
    source = build_source(config)
    stream = ShardStream(source, TRANSFORM, 4, seed=3, streams=2)  # 6 samples per slot and epoch
    full = list(islice(stream.slot_stream(1), 20))
    assert [epoch for epoch, _, _ in full] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2
    assert [position for _, position, _ in full[:7]] == [0, 1, 2, 3, 4, 5, 0]
    assert list(islice(stream.slot_stream(1, skip=9), 11)) == full[9:]
    assert_same_batches(batches(source, 0, 5, streams=2)[2:], batches(source, 8, 3, streams=2))


def test_shuffle_buffer_is_a_seeded_permutation() -> None:
    def shuffled(size: int, seed: int) -> list[int]:
        return list(shuffle_buffer(range(50), size, np.random.default_rng(seed)))

    assert sorted(shuffled(10, 0)) == list(range(50)) and shuffled(10, 0) != list(range(50))
    assert shuffled(10, 0) == shuffled(10, 0) != shuffled(10, 1)
    assert shuffled(1, 0) == shuffled(0, 0) == list(range(50))


# ----------------------------------------------------------------------------------------------
# Shards for evaluation: CLIP_benchmark's wds_<name>/ folders, and an index of the samples
# ----------------------------------------------------------------------------------------------
def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_wds_folder(root: Path, shards: int = 11, per_shard: int = 2, retrieval: bool = False) -> Path:
    """``root/wds_colours``: test/0.tar .. test/{shards-1}.tar (nshards.txt), classnames, templates."""
    folder = root / "wds_colours"
    (folder / "test").mkdir(parents=True)
    for shard in range(shards):
        members = []
        for position in range(per_shard):
            key, number = f"{shard:03d}{position}", shard * per_shard + position
            members.append((f"{key}.webp" if number == 0 else f"{key}.png", png((number, 0, 0))))
            if retrieval:
                members.append((f"{key}.txt", f"red {number}\nsquare {number}\n".encode()))
            else:
                members.append((f"{key}.cls", f"{number % 3}\n".encode()))
        write_tar(folder / "test" / f"{shard}.tar", members)
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "classnames.txt").write_text("red\ngreen\nblue\n\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    if retrieval:
        (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder


def test_clip_benchmarks_wds_folder_is_read_with_its_class_names_and_templates(tmp_path: Path) -> None:
    from clipforge.data.shard_index import IndexedShards

    folder = write_wds_folder(tmp_path)
    source = ShardSource(str(folder))
    # nshards.txt's order, 0..10, not the file names' (0, 1, 10, 2 ...); the split folder works as the path too
    assert [Path(shard).name for shard in source.shards] == [f"{n}.tar" for n in range(11)]
    assert ShardSource(str(folder / "test")).shards == source.shards
    assert source.classnames == ["red", "green", "blue"] and source.templates == [
        "a photo of a {c}.",
        "art of the {c}.",
    ]
    index = IndexedShards(source)
    assert len(index) == 22 and index.labels.tolist() == [n % 3 for n in range(22)]
    assert index.classnames == ["red", "green", "blue"] and index.templates == source.templates
    assert index.captions(4) == ["green"]  # a classification sample: its class name
    assert index.load_image(0).getpixel((0, 0)) == (0, 0, 0) and index.load_image(21).getpixel((2, 2))[0] == 21
    assert index.describe(21).endswith("10.tar:0101")
    # memory: NumPy arrays, no object per sample
    assert index._offsets.nbytes + index._sizes.nbytes + index._shard.nbytes + index._keys.offsets.nbytes < 100 * 22


def test_retrieval_shards_hold_one_caption_a_line(tmp_path: Path) -> None:
    from clipforge.data.shard_index import IndexedShards

    index = IndexedShards(ShardSource(str(write_wds_folder(tmp_path, shards=2, retrieval=True))))
    assert index.captions(3) == ["red 3", "square 3"] and index.labels is None
    packed = write_shards(tmp_path / "packed", shapes_samples()[:3], shard_size=2)  # img2dataset: one caption a .txt
    assert IndexedShards(ShardSource(packed)).captions(0) == ["a small red circle"]


def test_shard_folders_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    from clipforge.data.shard_index import IndexedShards

    empty = tmp_path / "wds_empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no \.tar shard \(its sub-folders: \['train'\]\)"):
        ShardSource(str(empty))
    # some samples labelled, some not: the index says which one lacks its label
    write_tar(tmp_path / "mixed.tar", [("a.png", png((1, 2, 3))), ("a.cls", b"1"), ("b.png", png((1, 2, 3)))])
    with pytest.raises(ValueError, match=r"1 of 2 samples .* have no label \(first: .*mixed.tar:b\)"):
        _ = IndexedShards(ShardSource(str(tmp_path / "mixed.tar"))).labels
    # a sample without an image is indexed, and skipped (counted) when its image is asked for
    write_tar(tmp_path / "noimage.tar", [("a.png", png((1, 2, 3))), ("a.txt", b"x"), ("b.txt", b"y")])
    index = IndexedShards(ShardSource(str(tmp_path / "noimage.tar")))
    assert len(index) == 2 and index.captions(1) == ["y"]
    with pytest.raises(Exception, match="no image member"):
        index.load_image(1)
