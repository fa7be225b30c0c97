"""Every picture clipforge draws: training curves and retrieval grids (PNG, via matplotlib's Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss (left axis) and learning rate (right axis) against the step, from metrics.jsonl records."""
    records = [r for r in records if "loss" in r]
    if not records:
        raise ValueError("no records with a 'loss' to plot; was anything logged?")
    steps = [r["step"] for r in records]
    figure, loss_axis = plt.subplots(figsize=(7, 4), dpi=120)
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("contrastive loss", color="tab:blue")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="learning rate")
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    loss_axis.set_title("training")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def plot_retrieval_grid(
    queries: Sequence[str],
    results: Sequence[Sequence[Image.Image]],
    correct: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]],
    path: str | Path,
    title: str = "text -> image: top results",
) -> Path:
    """One row per text query: the query, then its top-k images, correct ones framed in green."""
    rows, columns = len(queries), max(len(r) for r in results)
    figure, axes = plt.subplots(
        rows, columns + 1, figsize=(1.6 * (columns + 1) + 1.6, 1.6 * rows), dpi=120, squeeze=False
    )
    for row, (query, images, hits, values) in enumerate(zip(queries, results, correct, scores, strict=True)):
        text_axis = axes[row][0]
        text_axis.axis("off")
        text_axis.text(1.0, 0.5, query, ha="right", va="center", wrap=True, fontsize=8)
        for column in range(columns):
            axis = axes[row][column + 1]
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(images):
                axis.axis("off")
                continue
            axis.imshow(images[column])
            colour = "tab:green" if hits[column] else "lightgrey"
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3 if hits[column] else 1)
            axis.set_title(f"{column + 1}: {values[column]:.2f}", fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
