"""Filling the feature cache of a run's locked towers, so that training reads features instead of running them.

Which towers are cached (``plan_feature_cache``): a fully locked text tower always (a caption always tokenizes
the same); a fully locked image tower when its training transform is deterministic (one view), or, with random
augmentation, when ``data.cached_views`` = K > 0 (K views per image, view ``v`` transformed from the seed
``(0, v, index)``). Partly locked towers still train, so they always run live.

Each entry's identity (what its folder name hashes, see :mod:`clipforge.data.feature_cache`):

* the tower: its config minus the training-only settings (lock, lr, head), and a SHA-256 of its state dict
  (weights and BatchNorm statistics), so other weights, another architecture or a changed file all miss;
* the preprocessing: the image transform's size, mean/std, interpolation and augmentation, or the tokenizer
  (its saved state) and context length;
* the data: the source's settings (kind, path, split, columns ...), its size, a hash of all its captions and
  the size and modification time of its files; and the view index. Image entries leave out the captions and
  the caption-only settings (``captions``, ``caption_templates``, ``caption_column``).

Features are computed in float32 with the towers in eval mode, whatever ``train.precision`` is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipforge.config import Config, DataConfig
from clipforge.data.base import ImageLoadError, ImageTextSource, capabilities_of
from clipforge.data.feature_cache import CachedFeatures, FeatureStore, caption_offsets
from clipforge.data.processor import Processor
from clipforge.data.samples import prepare_sample, sample_seed
from clipforge.data.transforms import is_deterministic
from clipforge.eval.features import encode_text_batches
from clipforge.io import weights_fingerprint
from clipforge.model import CLIPModel
from clipforge.runtime import forward_in_cpu_chunks
from clipforge.train.run_log import progress_bar

logger = logging.getLogger("clipforge")

IMAGE_CHUNK = 64  # images between two progress records
TEXT_CHUNK = 4096  # captions between two progress records: each chunk is sorted by length, then batched
TEXT_BATCH = 256
VIEW_SEED = 0  # cached views do not depend on the run's seed, so runs with other seeds share them
# settings that change how a tower trains, not what its locked features are (a tower with LoRA adapters is never
# locked, and patch dropout acts in training mode only, where a locked tower never is)
_TRAINING_ONLY = ("lock", "lr_scale", "layer_decay", "head", "head_dropout", "tokenizer", "lora", "patch_dropout")
# data settings that change how samples are drawn or loaded, not which samples exist
_LOADING_ONLY = (
    "num_workers",
    "augment",
    "caption_sampling",
    "cache_features",
    "cached_views",
    "feature_cache",
    "weight",
    "epoch_size",
    "shuffle_buffer",
    "resample",
)
# data settings that change the captions only: image entries leave them out
_CAPTIONS_ONLY = ("captions", "caption_templates", "caption_column")


@dataclass(frozen=True)
class CachePlan:
    """``image_views``: views of each image to cache (0 = the image tower runs live); ``text``: cache captions."""

    image_views: int = 0
    text: bool = False

    @property
    def any(self) -> bool:
        return self.image_views > 0 or self.text


def plan_feature_cache(config: Config, model: CLIPModel, source: Any) -> CachePlan:
    """Which towers of ``model`` the run reads from the cache (see the module docstring)."""
    if not config.data.cache_features or not capabilities_of(source).cacheable:
        return CachePlan()
    image_views = 0
    if model.image_locked:
        image_views = 1 if is_deterministic(config.data.augment) else config.data.cached_views
    return CachePlan(image_views=image_views, text=model.text_locked)


def _file_stamp(spec: str) -> list[Any] | None:
    path = Path(spec).expanduser() if spec else None
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def source_identity(data: DataConfig, source: ImageTextSource, captions: bool = True) -> dict[str, Any]:
    """What names a source's samples: its settings, size, captions (hashed) and files' sizes and times.
    ``captions=False``: what names its images only (for image entries), without the caption settings and the
    captions, so runs that differ in their captions alone share the image features."""
    settings = _sample_settings(dataclasses.asdict(data), () if captions else _CAPTIONS_ONLY)
    identity = {
        "settings": settings,
        "num_images": len(source),
        "files": [_file_stamp(data.get("path", "")), _file_stamp(data.get("image_root", ""))],
    }
    if captions:
        digest = hashlib.sha256()
        for index in range(len(source)):
            digest.update(json.dumps(list(source.captions(index))).encode())
        identity["captions_sha256"] = digest.hexdigest()
    return identity


def _sample_settings(settings: dict[str, Any], dropped: tuple[str, ...] = ()) -> dict[str, Any]:
    """A data section's settings without the loading-only ones (and ``dropped``), in its mix entries too: a mix
    whose weights or per-entry loader settings change still names the same samples, and so the same entries."""
    kept = {key: value for key, value in settings.items() if key not in _LOADING_ONLY + dropped}
    kept["mix"] = [_sample_settings(entry, dropped) for entry in settings.get("mix", [])]
    return kept


def _tower_settings(tower_config: Any) -> dict[str, Any]:
    return {key: value for key, value in dataclasses.asdict(tower_config).items() if key not in _TRAINING_ONLY}


def _image_rows(
    tower: nn.Module, source: ImageTextSource, transform: Callable, view: int, device: torch.device
) -> Callable[[int, int], np.ndarray]:
    def compute(start: int, stop: int) -> np.ndarray:
        pixels, rows = [], []
        for index in range(start, stop):
            try:
                image = source.load_image(index)
            except ImageLoadError as error:
                logger.warning("feature cache: skipping unreadable image %s: %s", source.describe(index), error)
                continue
            pixels.append(prepare_sample(image, ("",), sample_seed(VIEW_SEED, view, index), transform)[0])
            rows.append(index - start)
        features = np.full((stop - start, tower.output_dim), np.nan, dtype=np.float32)  # NaN = unreadable
        if pixels:
            with torch.inference_mode():
                features[rows] = forward_in_cpu_chunks(tower, torch.stack(pixels), device).cpu().numpy()
        return features

    return compute


def _text_rows(
    tower: nn.Module, captions: list[str], processor: Processor, device: torch.device
) -> Callable[[int, int], np.ndarray]:
    def compute(start: int, stop: int) -> np.ndarray:
        # batched by token count inside the chunk (encode_text_batches): far less padding than caption order
        with torch.inference_mode():
            rows = encode_text_batches(tower, processor, captions[start:stop], TEXT_BATCH, device)
        return rows.cpu().numpy()

    return compute


def _fill(store: FeatureStore, compute: Callable, chunk: int, what: str, show_progress: bool) -> None:
    if store.complete:
        logger.info("feature cache: %s read from %s", what, store.folder)
        return
    done = store.rows_done
    logger.info(
        "feature cache: computing %s (%d of %d rows left) into %s",
        what,
        store.num_rows - done,
        store.num_rows,
        store.folder,
    )
    # a bar on a terminal, plain lines in a log file (clipforge.train.run_log.progress_bar)
    bar = progress_bar(store.num_rows, f"caching {what}", "row", initial=done, enabled=show_progress)
    try:
        store.fill(compute, chunk, progress=bar.update)
    finally:
        bar.close()


def build_feature_cache(
    config: Config, model: CLIPModel, source: Any, processor: Processor, device: torch.device
) -> CachedFeatures | None:
    """Fill (or find) the cache entries of ``plan_feature_cache`` and return them for the loader; None when
    no tower is cached. Images go through ``processor``'s training transform (``data.augment``); the locked
    towers run in eval mode."""
    plan = plan_feature_cache(config, model, source)
    if not plan.any:
        return None
    root = Path(config.data.feature_cache or Path(config.train.output_dir) / "feature_cache")
    was_training = model.training
    model.eval()
    try:
        cached = CachedFeatures()
        if plan.image_views:
            image_identity = {
                "tower": _tower_settings(config.model.image),
                "weights_sha256": weights_fingerprint(model.image_tower),
                "preprocess": dataclasses.asdict(processor.preprocess),
                "augment": "deterministic"
                if is_deterministic(config.data.augment)
                else dataclasses.asdict(config.data.augment),
                "data": source_identity(config.data, source, captions=False),
            }
            cached.image_views = []
            for view in range(plan.image_views):
                store = FeatureStore(
                    root, "image", {**image_identity, "view": view}, len(source), model.image_tower.output_dim
                )
                compute = _image_rows(
                    model.image_tower, source, processor.image_transform(config.data.augment), view, device
                )
                _fill(store, compute, IMAGE_CHUNK, f"image features (view {view})", config.logging.progress)
                cached.image_views.append(store.path)
        if plan.text:
            captions = [caption for index in range(len(source)) for caption in source.captions(index)]
            text_identity = {
                "tower": _tower_settings(config.model.text),
                "weights_sha256": weights_fingerprint(model.text_tower),
                "tokenizer_sha256": hashlib.sha256(
                    json.dumps(processor.tokenizer.state_dict(), sort_keys=True).encode()
                ).hexdigest(),
                "context_length": processor.context_length,
                "data": source_identity(config.data, source),
            }
            store = FeatureStore(root, "text", text_identity, len(captions), model.text_tower.output_dim)
            compute = _text_rows(model.text_tower, captions, processor, device)
            _fill(store, compute, TEXT_CHUNK, "caption features", config.logging.progress)
            cached.text, cached.caption_offsets = store.path, caption_offsets(source)
    finally:
        model.train(was_training)
    return cached
