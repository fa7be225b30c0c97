"""The feature cache of locked towers: same training as live towers, invalidation, resumable builds, views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.config import AugmentConfig, Config
from clipforge.data.feature_cache import CachedFeatureDataset, CachedFeatures, FeatureStore
from clipforge.data.samples import caption_choice
from clipforge.data.sources import build_source
from clipforge.data.transforms import is_deterministic
from clipforge.train.loop import train
from tests.conftest import tiny_config


def locked_config(manifest: Path, output_dir: Path, cache: bool = True, **sections) -> Config:
    """Both towers locked (timm with BatchNorm + the built-in text transformer), deterministic transforms."""
    model = {
        "embed_dim": 16,
        "image": {"kind": "timm", "name": "test_resnet", "image_size": 32, "lock": True},
        "text": {
            "kind": "transformer",
            "width": 32,
            "depth": 1,
            "heads": 2,
            "context_length": 16,
            "lock": True,
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
        },
    }
    data = {"augment": {"scale_min": 1.0}, "cache_features": cache, **sections.pop("data", {})}
    train_section = {"steps": 8, "batch_size": 8, "checkpoint_every": 4, **sections.pop("train", {})}
    return tiny_config(manifest, output_dir, model=model, data=data, train=train_section, **sections)


def entries(root: Path, kind: str) -> list[str]:
    return sorted(p.name for p in root.glob(f"{kind}-*"))


def test_cached_training_follows_the_live_loss_trajectory(shapes_manifest: Path, tmp_path: Path) -> None:
    every_step = {"log_every": 1}
    live = train(locked_config(shapes_manifest, tmp_path / "live", cache=False, logging=every_step))
    cached = train(locked_config(shapes_manifest, tmp_path / "cached", logging=every_step))
    live_losses = [record["loss"] for record in live.history]
    cached_losses = [record["loss"] for record in cached.history]
    assert len(cached_losses) == 8
    np.testing.assert_allclose(cached_losses, live_losses, rtol=1e-5, atol=1e-6)
    root = tmp_path / "cached" / "feature_cache"
    assert len(entries(root, "image")) == 1 and len(entries(root, "text")) == 1


def test_resume_with_cached_features_is_exact(shapes_manifest: Path, tmp_path: Path) -> None:
    full = train(locked_config(shapes_manifest, tmp_path / "full"))
    first = train(locked_config(shapes_manifest, tmp_path / "half", train={"steps": 4}))
    assert first.step == 4
    resumed = train(locked_config(shapes_manifest, tmp_path / "half"), resume="latest")
    full_state = torch.load(full.checkpoint, weights_only=True)["model"]
    resumed_state = torch.load(resumed.checkpoint, weights_only=True)["model"]
    for name in ("image_head.proj.weight", "text_head.proj.weight", "log_logit_scale"):
        torch.testing.assert_close(resumed_state[name], full_state[name], atol=0, rtol=0)


def test_a_changed_config_invalidates_only_what_it_changes(shapes_manifest: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"
    base = {"feature_cache": str(shared)}
    train(locked_config(shapes_manifest, tmp_path / "a", data=base, train={"steps": 2}))
    image_entries, text_entries = entries(shared, "image"), entries(shared, "text")
    # the same settings in another run: both entries are reused, nothing is added
    train(locked_config(shapes_manifest, tmp_path / "b", data=base, train={"steps": 2}))
    assert entries(shared, "image") == image_entries and entries(shared, "text") == text_entries
    # other image preprocessing: a new image entry; the captions' entry still fits
    other_preprocessing = locked_config(shapes_manifest, tmp_path / "c", data=base, train={"steps": 2})
    train(_with(other_preprocessing, "model.image.mean", [0.5] * 3, "model.image.std", [0.5] * 3))
    assert len(entries(shared, "image")) == 2 and entries(shared, "text") == text_entries
    # other weights (another initialisation seed): new entries for both towers
    train(locked_config(shapes_manifest, tmp_path / "d", data=base, train={"steps": 2, "seed": 1}))
    assert len(entries(shared, "image")) == 3 and len(entries(shared, "text")) == 2


def _with(config: Config, *pairs) -> Config:
    for dotted, value in zip(pairs[::2], pairs[1::2], strict=True):
        section, *path, key = dotted.split(".")
        node = getattr(config, section)
        for part in path:
            node = getattr(node, part)
        setattr(node, key, value)
    return config


def test_a_partial_cache_resumes_where_it_stopped(tmp_path: Path) -> None:
    values = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    calls: list[tuple[int, int]] = []

    def compute(start: int, stop: int) -> np.ndarray:
        calls.append((start, stop))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted while computing the third chunk
        return values[start:stop]

    store = FeatureStore(tmp_path, "image", {"tower": "t"}, num_rows=10, dim=3)
    with pytest.raises(KeyboardInterrupt):
        store.fill(compute, chunk_rows=4)
    assert store.rows_done == 8 and not store.complete

    calls.clear()
    reopened = FeatureStore(tmp_path, "image", {"tower": "t"}, num_rows=10, dim=3)
    assert reopened.fill(compute, chunk_rows=4) == 2
    assert calls == [(8, 10)] and reopened.complete
    np.testing.assert_array_equal(np.load(reopened.path), values)
    assert reopened.fill(compute, chunk_rows=4) == 0  # complete: nothing computed again

    other = FeatureStore(tmp_path, "image", {"tower": "other weights"}, num_rows=10, dim=3)
    assert other.folder != reopened.folder and other.rows_done == 0


def test_a_damaged_entry_starts_afresh(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, "text", {"tower": "t"}, num_rows=4, dim=2)
    store.fill(lambda start, stop: np.ones((stop - start, 2)), chunk_rows=4)
    np.save(store.path, np.zeros((3, 2), dtype=np.float32))  # wrong shape, progress says complete
    (store.folder / "progress.json").write_text('{"rows_done": 2}')
    assert store.fill(lambda start, stop: np.full((stop - start, 2), 7.0), chunk_rows=4) == 4
    np.testing.assert_array_equal(np.load(store.path), np.full((4, 2), 7.0, dtype=np.float32))


def test_random_augmentation_caches_k_views_read_by_visit(shapes_manifest: Path, tmp_path: Path) -> None:
    assert is_deterministic(AugmentConfig(scale_min=1.0)) and not is_deterministic(AugmentConfig(scale_min=0.9))
    config = locked_config(shapes_manifest, tmp_path / "run", data={"augment": {"scale_min": 0.6}, "cached_views": 2})
    train(_with(config, "train.steps", 2))
    root = tmp_path / "run" / "feature_cache"
    views = entries(root, "image")
    assert len(views) == 2
    paths = [root / name / "features.npy" for name in views]
    first, second = (np.load(path) for path in paths)
    assert not np.allclose(first, second)  # two different random crops of every image

    source = build_source(config.data)
    text_rows = np.arange(48 * 4, dtype=np.float32).reshape(48, 4)
    np.save(tmp_path / "text.npy", text_rows)
    offsets = np.arange(0, 2 * len(source) + 1, 2)
    features = CachedFeatures(image_views=paths, text=tmp_path / "text.npy", caption_offsets=offsets)
    dataset = CachedFeatureDataset(source, transform=None, features=features)
    for visit in range(3):
        image, text = dataset[(5, 123, visit)]
        view = np.load(paths[visit % 2])
        np.testing.assert_array_equal(image.numpy(), view[5])
        np.testing.assert_array_equal(text.numpy(), text_rows[10 + caption_choice(2, 123, "random", visit)])


def test_a_mix_with_other_weights_reads_the_same_cache_entries(shapes_manifest: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"

    def mixed(folder: str, weights: tuple[float, float], sampling: str = "random") -> Config:
        parts = [{"kind": "manifest", "path": str(shapes_manifest), "weight": w, "num_workers": 0} for w in weights]
        parts[1]["caption_sampling"] = sampling
        data = {"kind": "mix", "mix": parts, "feature_cache": str(shared)}
        return locked_config(shapes_manifest, tmp_path / folder, data=data, train={"steps": 2})

    train(mixed("a", (1.0, 1.0)))
    image_entries, text_entries = entries(shared, "image"), entries(shared, "text")
    assert len(image_entries) == 1 and len(text_entries) == 1
    train(mixed("b", (3.0, 0.5), sampling="cycle"))  # how samples are drawn changes, not which exist
    assert entries(shared, "image") == image_entries and entries(shared, "text") == text_entries


def test_caption_templates_add_captions_and_keep_the_image_entry(shapes_manifest: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared-cache"
    train(locked_config(shapes_manifest, tmp_path / "a", data={"feature_cache": str(shared)}, train={"steps": 2}))
    image_entries, text_entries = entries(shared, "image"), entries(shared, "text")
    templates = ["a drawing of {}.", "{} on a plain background"]
    data = {"feature_cache": str(shared), "caption_templates": templates}
    config = locked_config(shapes_manifest, tmp_path / "b", data=data, train={"steps": 2})
    train(config)
    # the captions changed, the images did not: the image features are read again, the captions' are new
    assert entries(shared, "image") == image_entries
    assert len(entries(shared, "text")) == 2 and text_entries[0] in entries(shared, "text")
    bare, templated = build_source(locked_config(shapes_manifest, tmp_path / "c").data), build_source(config.data)
    for index in range(len(bare)):
        originals = bare.captions(index)
        expected = originals + [t.format(c) for t in templates for c in originals]
        assert templated.captions(index) == expected
        assert templated.describe(index) == bare.describe(index)
    assert templated.classnames == bare.classnames  # everything but the captions is the source's own
