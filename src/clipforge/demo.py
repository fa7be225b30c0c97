"""``clipforge demo``: train a small CLIP on the built-in emoji set, then report on held-out concepts.

The emoji set's concept-level split keeps every variant of a held-out concept (skin tones, hair,
gender) out of training, so the figures measure generalization to unseen concepts. Each figure is
printed beside its chance level. Settings of the recipe were chosen on the ``val`` split
(``--eval-split val``); ``test`` is only reported.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.config import load_config
from clipforge.data.emoji import GROUPS
from clipforge.data.sources import EmojiSource
from clipforge.eval.features import encode_source_images, encode_texts
from clipforge.eval.retrieval import retrieval_metrics
from clipforge.eval.zeroshot import build_zeroshot_classifier, zeroshot_metrics
from clipforge.train.checkpoint import LoadedCheckpoint, load_checkpoint
from clipforge.train.logging import read_metrics
from clipforge.train.loop import train
from clipforge.viz import plot_retrieval_grid, plot_training_curves

logger = logging.getLogger("clipforge")

GROUP_PROMPT = "an emoji of {}"


@dataclass
class DemoReport:
    """Held-out figures with their chance levels, and the files the demo wrote."""

    metrics: dict[str, float]
    chance: dict[str, float]
    files: dict[str, Path]
    seconds: float


def evaluate_emoji(loaded: LoadedCheckpoint, split: str) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Retrieval (name <-> image) and group zero-shot on one split of the emoji set.

    Returns (metrics, chance levels, the raw similarities needed for pictures).
    """
    source = EmojiSource(split)
    model, config = loaded.model, loaded.config
    images = encode_source_images(model, source, config.model.image)
    # one caption (the name) per emoji; caption k describes image row k
    captions = [source.captions(int(i))[0] for i in images.indices]
    text_features = encode_texts(model, loaded.tokenizer, captions, config.model.text.context_length)
    text_to_image = torch.arange(len(captions))
    retrieval = retrieval_metrics(images.features, text_features, text_to_image, ks=(1, 5, 10))

    def encode(texts: list[str]) -> torch.Tensor:
        return encode_texts(model, loaded.tokenizer, texts, config.model.text.context_length)

    classifier = build_zeroshot_classifier(encode, list(GROUPS), [GROUP_PROMPT])
    labels = torch.as_tensor(source.labels[images.indices])
    zeroshot = zeroshot_metrics(images.features, classifier, labels, ks=(1, 5))
    count = len(images.indices)
    counts = np.bincount(labels.numpy(), minlength=len(GROUPS))
    metrics = {
        "text_to_image_R@1": retrieval["image_retrieval_recall@1"],
        "text_to_image_R@5": retrieval["image_retrieval_recall@5"],
        "image_to_text_R@1": retrieval["text_retrieval_recall@1"],
        "image_to_text_R@5": retrieval["text_retrieval_recall@5"],
        "group_zeroshot_top1": zeroshot["acc1"],
        "group_zeroshot_mean_per_class_recall": zeroshot["mean_per_class_recall"],
    }
    chance = {
        "text_to_image_R@1": 1 / count,
        "text_to_image_R@5": 5 / count,
        "image_to_text_R@1": 1 / count,
        "image_to_text_R@5": 5 / count,
        "group_zeroshot_top1": 1 / len(GROUPS),
        "group_zeroshot_top1_majority": counts.max() / count,
        "group_zeroshot_mean_per_class_recall": 1 / len(GROUPS),
    }
    extras = {"source": source, "images": images, "text_features": text_features, "captions": captions}
    return metrics, chance, extras


def format_report(metrics: dict[str, float], chance: dict[str, float], split: str, count: int) -> str:
    lines = [f"held-out results on the emoji '{split}' split ({count} emoji, concepts unseen in training)"]
    lines.append(f"  {'metric':<40} {'value':>8} {'chance':>8} {'x chance':>9}")
    for key, value in metrics.items():
        base = chance[key]
        lines.append(f"  {key:<40} {value:8.3f} {base:8.3f} {value / base:9.1f}")
    lines.append(f"  {'(group zero-shot majority-class top-1)':<40} {chance['group_zeroshot_top1_majority']:8.3f}")
    return "\n".join(lines)


def _retrieval_picture(extras: dict[str, Any], path: Path, queries: int = 6, top: int = 5) -> Path:
    source, images = extras["source"], extras["images"]
    scores = extras["text_features"] @ images.features.T  # (N_text, N_image): a few hundred, fits
    picks = np.linspace(0, len(extras["captions"]) - 1, queries).round().astype(int)
    rows, hits, values = [], [], []
    for caption_index in picks:
        best = scores[caption_index].topk(top)
        found_rows = best.indices.tolist()
        rows.append([source.load_image(int(images.indices[r])) for r in found_rows])
        hits.append([r == int(caption_index) for r in found_rows])
        values.append(best.values.tolist())
    texts = [extras["captions"][i] for i in picks]
    return plot_retrieval_grid(texts, rows, hits, values, path, title="held-out emoji: name -> top-5 images")


def run_demo(
    output_dir: str | Path = "demo-output", overrides: Sequence[str] = (), eval_split: str = "test"
) -> DemoReport:
    """Train the ``demo`` recipe into ``output_dir/run``, evaluate on ``eval_split``, draw, report."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    config = load_config("demo", [f"train.output_dir={output_dir / 'run'}", *overrides])
    result = train(config)
    loaded = load_checkpoint(result.checkpoint)
    metrics, chance, extras = evaluate_emoji(loaded, eval_split)
    files = {
        "loss_curve": plot_training_curves(
            read_metrics(result.output_dir / "metrics.jsonl"), output_dir / "loss_curve.png"
        ),
        "retrieval_grid": _retrieval_picture(extras, output_dir / "retrieval_grid.png"),
    }
    seconds = time.perf_counter() - started
    results_path = output_dir / "results.json"
    results_path.write_text(
        json.dumps({"split": eval_split, "metrics": metrics, "chance": chance, "seconds": seconds}, indent=2)
    )
    files["results"] = results_path
    print(format_report(metrics, chance, eval_split, len(extras["captions"])))
    print(f"wrote {', '.join(str(p) for p in files.values())} in {seconds:.0f} s")
    return DemoReport(metrics, chance, files, seconds)
