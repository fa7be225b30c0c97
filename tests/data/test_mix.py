"""Weighted mixes of sources, the weighted sampler's proportions and exact resume, and caption cycling."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.config import ConfigError, DataConfig, config_from_dict
from clipforge.data.emoji import EmojiSource
from clipforge.data.loader import ImageTextDataset, LoaderSpec, build_train_loader
from clipforge.data.manifest import ManifestSource
from clipforge.data.mix import MixSource
from clipforge.data.sampler import ResumableSampler
from clipforge.data.samples import SampleKey
from clipforge.data.sources import TemplatedCaptions, build_source
from clipforge.data.tokenize import train_bpe_tokenizer
from tests.conftest import processor_for, write_shapes_manifest


class ListSource:
    """A stand-in source: ``size`` images named ``name``, each with ``captions`` numbered captions."""

    labels = None
    classnames = None

    def __init__(self, name: str, size: int, captions: int = 1) -> None:
        self.name, self.size, self.count = name, size, captions

    def __len__(self) -> int:
        return self.size

    def load_image(self, index: int):
        from PIL import Image

        return Image.new("RGB", (4, 4))

    def captions(self, index: int) -> list[str]:
        return [f"{self.name} {index} caption {k}" for k in range(self.count)]

    def describe(self, index: int) -> str:
        return f"{self.name}/{index}"


def take(iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def test_mix_concatenates_and_weights_each_source_as_a_whole() -> None:
    mix = MixSource([ListSource("a", 3), ListSource("b", 7)], [0.7, 0.3])
    assert len(mix) == 10 and mix.locate(4) == (1, 1) and mix.captions(3) == ["b 0 caption 0"]
    assert mix.describe(9) == "mix[1]: b/6" and mix.source_of(np.array([0, 2, 3, 9])).tolist() == [0, 0, 1, 1]
    assert np.isclose(mix.sample_weights.sum(), 1.0)
    assert np.isclose(mix.sample_weights[:3].sum(), 0.7) and np.allclose(mix.sample_weights[3:], 0.3 / 7)
    with pytest.raises(IndexError):
        mix.load_image(10)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 1.0, 8.0)])
def test_weighted_draws_follow_the_weights_whatever_the_sizes(weights: tuple[float, ...]) -> None:
    sizes = [5, 400, 37][: len(weights)]  # a small source oversampled, a large one undersampled
    mix = MixSource([ListSource(str(s), size) for s, size in enumerate(sizes)], weights)
    draws = np.array([key.index for key in take(iter(ResumableSampler(len(mix), 0, weights=mix.sample_weights)), 4000)])
    shares = np.bincount(mix.source_of(draws), minlength=len(sizes)) / len(draws)
    assert np.allclose(shares, np.array(weights) / sum(weights), atol=0.02), shares
    # within a source, images are drawn evenly: the small source's 5 images each about 1/5 of its draws
    small = np.bincount(draws[draws < sizes[0]], minlength=sizes[0])
    assert small.min() >= 0.8 * small.max()


def test_weighted_epoch_counts_are_floor_or_ceil_of_the_expectation() -> None:
    weights = np.array([5.0, 1.0, 1.0, 0.0, 3.0])
    order = ResumableSampler(5, 3, weights=weights).full_epoch_order(2)
    counts = np.bincount(order, minlength=5)
    expected = 5 * weights / weights.sum()  # [2.5, 0.5, 0.5, 0, 1.5]
    assert counts.sum() == 5 and counts[3] == 0
    assert np.all(counts >= np.floor(expected)) and np.all(counts <= np.ceil(expected))


def test_weighted_sampler_resumes_exactly_and_numbers_visits() -> None:
    weights = MixSource([ListSource("a", 2), ListSource("b", 9)], [0.5, 0.5]).sample_weights
    stream = take(iter(ResumableSampler(11, seed=4, weights=weights)), 60)
    assert all(isinstance(key, SampleKey) for key in stream)
    for start in (1, 11, 23, 40):
        assert take(iter(ResumableSampler(11, seed=4, start=start, weights=weights)), 60 - start) == stream[start:]
    # visit numbers count each image's earlier draws exactly, and repeated draws get fresh seeds
    seen: dict[int, int] = {}
    for key in stream:
        assert key.visit == seen.get(key.index, 0)
        seen[key.index] = key.visit + 1
    seeds_of_zero = [key.seed for key in stream if key.index == 0]
    assert len(seeds_of_zero) > 5 and len(set(seeds_of_zero)) == len(seeds_of_zero)
    # ranks split every weighted epoch without overlap, and resume per rank
    ranks = [take(iter(ResumableSampler(11, 4, rank=r, world_size=2, weights=weights)), 15) for r in range(2)]
    single = ResumableSampler(11, 4, weights=weights)
    for epoch in range(3):
        order = single.full_epoch_order(epoch)
        for r in range(2):
            assert [key.index for key in ranks[r][5 * epoch : 5 * epoch + 5]] == order[r:10:2].tolist()
    assert take(iter(ResumableSampler(11, 4, start=7, rank=1, world_size=2, weights=weights)), 8) == ranks[1][7:]


def test_unweighted_visits_are_epochs_and_seeds_are_unchanged() -> None:
    stream = take(iter(ResumableSampler(4, seed=1)), 12)
    assert [key.visit for key in stream] == [0] * 4 + [1] * 4 + [2] * 4


def test_cycle_caption_sampling_takes_caption_visit_mod_n() -> None:
    source = ListSource("img", 3, captions=2)
    cycle = ImageTextDataset(source, lambda image: torch.zeros(3, 2, 2), caption_sampling="cycle")
    stream = take(iter(ResumableSampler(3, seed=0)), 9)
    captions = [cycle[key][1] for key in stream if key.index == 1]
    assert captions == ["img 1 caption 0", "img 1 caption 1", "img 1 caption 0"]
    assert cycle[(1, 5)][1] == "img 1 caption 0"  # evaluation-style (index, seed) keys mean visit 0
    random = ImageTextDataset(source, lambda image: torch.zeros(3, 2, 2))
    assert {random[(1, seed)][1] for seed in range(20)} == {"img 1 caption 0", "img 1 caption 1"}
    with pytest.raises(ValueError, match=r"caption_sampling='first' is unknown; choose one of \['random', 'cycle'\]"):
        ImageTextDataset(source, lambda image: image, caption_sampling="first")


def test_mix_from_config_trains_through_the_loader_and_resumes(tmp_path: Path) -> None:
    manifest = write_shapes_manifest(tmp_path / "shapes")
    config = config_from_dict(
        {
            "data": {
                "kind": "mix",
                "caption_sampling": "cycle",
                "mix": [{"kind": "manifest", "path": str(manifest), "weight": 0.25}, {"kind": "emoji", "weight": 0.75}],
            }
        }
    )
    source = build_source(config.data)
    assert isinstance(source, MixSource) and isinstance(source.sources[0], ManifestSource)
    assert isinstance(source.sources[1], EmojiSource)
    tokenizer = train_bpe_tokenizer(["a red circle", "grinning face"], vocab_size=270)

    def batches(start: int, count: int) -> list:
        spec = LoaderSpec(
            processor_for(tokenizer, 16, 8), None, 8, seed=2, start_sample=start, caption_sampling="cycle"
        )
        loader = build_train_loader(source, spec)
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    full, resumed = batches(0, 5), batches(16, 3)
    for expected, got in zip(full[2:], resumed, strict=True):
        assert torch.equal(expected.images, got.images) and torch.equal(expected.input_ids, got.input_ids)


def test_mix_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"data.kind='mix' needs data.mix"):
        config_from_dict({"data": {"kind": "mix"}})
    with pytest.raises(ConfigError, match=r"data.mix\[1\].weight=0.0 must be positive"):
        config_from_dict({"data": {"kind": "mix", "mix": [{"kind": "emoji"}, {"kind": "emoji", "weight": 0}]}})
    with pytest.raises(FileNotFoundError, match=r"manifest file '.*nowhere.csv' does not exist"):
        build_source(
            DataConfig(kind="mix", mix=[DataConfig(kind="emoji"), DataConfig(kind="manifest", path="nowhere.csv")])
        )


def test_caption_templates_on_a_whole_mix_keep_its_sampling_weights() -> None:
    mix = MixSource([ListSource("a", 3), ListSource("b", 5, captions=2)], [1.0, 3.0])
    templated = TemplatedCaptions(mix, ["a drawing of {}."])
    np.testing.assert_array_equal(templated.sample_weights, mix.sample_weights)
    assert len(templated) == 8
    for index in range(len(mix)):
        originals = mix.captions(index)
        assert templated.captions(index) == originals + [f"a drawing of {c}." for c in originals]
    # spawned loader workers get the source pickled: __getattr__ must not recurse while it is rebuilt
    restored = pickle.loads(pickle.dumps(templated))
    assert [restored.captions(i) for i in range(8)] == [templated.captions(i) for i in range(8)]
