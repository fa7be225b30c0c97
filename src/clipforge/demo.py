"""``clipforge demo``: train a small CLIP on the built-in emoji set, then report on held-out concepts.

The emoji set's concept-level split keeps every variant of a held-out concept (skin tones, hair,
gender) out of training, so the figures measure generalization to unseen concepts. Each figure is
printed beside its chance level. Settings of the recipe were chosen on the ``val`` split
(``--eval-split val``); ``test`` is only reported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipforge.config import load_config
from clipforge.data.emoji import GROUPS
from clipforge.data.sources import EmojiSource
from clipforge.eval.command import plot_retrieval_examples
from clipforge.eval.runner import EvalResult, evaluate_retrieval, evaluate_zeroshot
from clipforge.train.checkpoint import LoadedCheckpoint, load_checkpoint
from clipforge.train.logging import read_metrics
from clipforge.train.loop import train
from clipforge.viz import plot_training_curves

GROUP_PROMPT = "an emoji of {}"


@dataclass
class DemoReport:
    """Held-out figures with their chance levels, and the files the demo wrote."""

    metrics: dict[str, float]
    chance: dict[str, float]
    files: dict[str, Path]
    seconds: float


def evaluate_emoji(loaded: LoadedCheckpoint, split: str) -> tuple[dict[str, float], dict[str, float], EvalResult]:
    """Retrieval (name <-> image) and group zero-shot on one split of the emoji set.

    Returns (metrics, chance levels, the retrieval result whose embeddings the picture uses).
    """
    source = EmojiSource(split)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    retrieval = evaluate_retrieval(model, tokenizer, config, source)
    zeroshot = evaluate_zeroshot(model, tokenizer, config, source, templates=[GROUP_PROMPT])
    count = retrieval.num_images
    counts = np.bincount(source.labels, minlength=len(GROUPS))
    metrics = {
        "text_to_image_R@1": retrieval.metrics["image_retrieval_recall@1"],
        "text_to_image_R@5": retrieval.metrics["image_retrieval_recall@5"],
        "image_to_text_R@1": retrieval.metrics["text_retrieval_recall@1"],
        "image_to_text_R@5": retrieval.metrics["text_retrieval_recall@5"],
        "group_zeroshot_top1": zeroshot.metrics["acc1"],
        "group_zeroshot_mean_per_class_recall": zeroshot.metrics["mean_per_class_recall"],
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


def format_report(metrics: dict[str, float], chance: dict[str, float], split: str, count: int) -> str:
    lines = [f"held-out results on the emoji '{split}' split ({count} emoji, concepts unseen in training)"]
    lines.append(f"  {'metric':<40} {'value':>8} {'chance':>8} {'x chance':>9}")
    for key, value in metrics.items():
        base = chance[key]
        lines.append(f"  {key:<40} {value:8.3f} {base:8.3f} {value / base:9.1f}")
    lines.append(f"  {'(group zero-shot majority-class top-1)':<40} {chance['group_zeroshot_top1_majority']:8.3f}")
    return "\n".join(lines)


def run_demo(
    output_dir: str | Path = "demo-output", overrides: Sequence[str] = (), eval_split: str = "test"
) -> DemoReport:
    """Train the ``demo`` recipe into ``output_dir/run``, evaluate on ``eval_split``, draw, report."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    config = load_config("demo", [f"train.output_dir={output_dir / 'run'}", *overrides])
    result = train(config)
    loaded = load_checkpoint(result.checkpoint)
    metrics, chance, retrieval = evaluate_emoji(loaded, eval_split)
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
    results_path.write_text(
        json.dumps({"split": eval_split, "metrics": metrics, "chance": chance, "seconds": seconds}, indent=2)
    )
    files["results"] = results_path
    print(format_report(metrics, chance, eval_split, retrieval.num_images))
    print(f"wrote {', '.join(str(p) for p in files.values())} in {seconds:.0f} s")
    return DemoReport(metrics, chance, files, seconds)
