from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipforge.config import AugmentConfig
from clipforge.data.loader import ImageTextDataset, LoaderSpec, build_train_loader
from clipforge.data.manifest import ManifestSource
from clipforge.data.sampler import ResumableSampler
from clipforge.data.samples import Collator, SkippedSample
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.data.transforms import ImagePreprocess, build_image_transform, is_deterministic
from tests.conftest import processor_for


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_sampler_epochs_are_permutations_and_resume_exactly() -> None:
    sampler = ResumableSampler(10, seed=3)
    stream = take(iter(sampler), 30)
    for epoch in range(3):
        assert sorted(i for i, *_ in stream[epoch * 10 : epoch * 10 + 10]) == list(range(10))
    assert [i for i, *_ in stream[:10]] != [i for i, *_ in stream[10:20]]  # a new order each epoch
    for start in (0, 4, 10, 17):
        resumed = take(iter(ResumableSampler(10, seed=3, start=start)), 30 - start)
        assert resumed == stream[start:]


def test_sampler_seeds_differ_per_visit() -> None:
    stream = take(iter(ResumableSampler(5, seed=0)), 10)
    seeds_of_zero = [s for i, s, _ in stream if i == 0]
    assert len(seeds_of_zero) == 2 and seeds_of_zero[0] != seeds_of_zero[1]


def test_ranks_are_disjoint_and_cover_each_epoch() -> None:
    per_rank = [take(iter(ResumableSampler(11, seed=1, rank=r, world_size=2)), 5) for r in range(2)]
    first, second = ({i for i, *_ in part} for part in per_rank)
    assert not first & second and len(first | second) == 10  # 11 % 2 = 1 sample left out this epoch


def test_dataset_is_deterministic_per_seed_and_skips_bad_images(shapes_manifest: Path) -> None:
    source = ManifestSource(shapes_manifest)
    preprocess = ImagePreprocess(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    dataset = ImageTextDataset(source, build_image_transform(preprocess, AugmentConfig(scale_min=0.3)))
    first, again, other = dataset[(0, 123)], dataset[(0, 123)], dataset[(0, 124)]
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert not torch.equal(first[0], other[0])  # another visit gets another crop
    state = torch.get_rng_state()
    dataset[(1, 5)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched

    (shapes_manifest.parent / source.describe(2)).write_bytes(b"not a png")
    bad = dataset[(2, 0)]
    assert isinstance(bad, SkippedSample) and source.describe(2) in bad.where
    tokenizer = train_bpe_tokenizer(["a red circle", "blue square"], vocab_size=280)
    batch = Collator(processor_for(tokenizer, 16))([first, bad, other])
    assert len(batch) == 2 and len(batch.skipped) == 1 and batch.images.shape == (2, 3, 24, 24)


def test_loader_resumes_mid_epoch_with_workers(shapes_manifest: Path) -> None:
    source = ManifestSource(shapes_manifest)
    tokenizer = train_bpe_tokenizer([c for i in range(len(source)) for c in source.captions(i)], vocab_size=300)
    processor, augment = processor_for(tokenizer, 16, 16), AugmentConfig(scale_min=0.5)

    def batches(start: int, workers: int, count: int):
        loader = build_train_loader(
            source, LoaderSpec(processor, augment, 6, seed=7, start_sample=start, num_workers=workers)
        )
        iterator = iter(loader)
        return [next(iterator) for _ in range(count)]

    full = batches(0, 0, 7)  # 42 samples: crosses the 24-image epoch boundary
    resumed = batches(18, 2, 4)  # 3 batches in, read by two worker processes
    for expected, got in zip(full[3:], resumed, strict=True):
        assert torch.equal(expected.images, got.images)
        assert torch.equal(expected.input_ids, got.input_ids)
    assert not np.array_equal(full[0].images.numpy(), full[4].images.numpy())


def test_colour_augmentations_grey_and_invert_and_count_as_random() -> None:
    preprocess = ImagePreprocess(16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    red = Image.new("RGB", (16, 16), (200, 10, 10))
    grey = build_image_transform(preprocess, AugmentConfig(scale_min=1.0, grayscale=1.0))(red)
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    assert 0.2 < float(grey.mean()) < 0.5  # luminance of (200, 10, 10): ~0.25, not the red channel's 0.78
    inverted = build_image_transform(preprocess, AugmentConfig(scale_min=1.0, invert=1.0))(red)
    assert torch.allclose(inverted[:, 0, 0], torch.tensor([55 / 255, 245 / 255, 245 / 255]), atol=1e-6)
    torch.manual_seed(0)
    jitter = build_image_transform(preprocess, AugmentConfig(scale_min=1.0, color_jitter=0.5))
    assert len({round(float(jitter(red).mean()), 4) for _ in range(6)}) > 1
    assert is_deterministic(AugmentConfig(scale_min=1.0))
    for name in ("color_jitter", "grayscale", "invert", "low_res"):
        assert not is_deterministic(AugmentConfig(scale_min=1.0, **{name: 0.5}))


def test_low_resolution_views_keep_the_size_and_lose_the_detail() -> None:
    """A one-pixel checkerboard at 64 px: a low-resolution view (20-40 px inside) keeps the shape and the mean
    grey but flattens the alternation, which the plain transform keeps exactly."""
    preprocess = ImagePreprocess(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.stack([board] * 3, axis=-1))
    plain = build_image_transform(preprocess, AugmentConfig(scale_min=1.0))(image)
    assert float((plain[:, 1:, :] - plain[:, :-1, :]).abs().mean()) == 1.0  # every neighbour differs fully
    torch.manual_seed(0)
    low = build_image_transform(preprocess, AugmentConfig(scale_min=1.0, low_res=1.0))
    for _ in range(3):
        view = low(image)
        assert view.shape == (3, 64, 64)
        assert abs(float(view.mean()) - 0.5) < 0.05
        assert float((view[:, 1:, :] - view[:, :-1, :]).abs().mean()) < 0.2
    # a view is a function of the sample's seed alone (prepare_sample seeds torch's generator)
    torch.manual_seed(1)
    first = low(image)
    torch.manual_seed(1)
    assert torch.equal(first, low(image))
