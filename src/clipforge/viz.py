"""Every picture clipforge draws: training curves, retrieval grids, confusion matrices (PNG, via matplotlib's Agg)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from clipforge.io import atomic_write  # noqa: E402


def save_figure(figure: Any, path: str | Path, replace: bool = False) -> Path:
    """Write ``figure`` to ``path`` in the format its suffix names (PNG without one), through
    :func:`clipforge.io.atomic_write` (whole or not at all, never over an input or an existing file unasked;
    ``replace``: the caller owns ``path``), and close it."""
    path = Path(path)
    image_format = path.suffix.lower().lstrip(".") or "png"
    try:
        atomic_write(path, lambda handle: figure.savefig(handle, format=image_format), replace=replace)
    finally:
        plt.close(figure)
    return path


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write a PIL ``image`` to ``path`` (format by suffix) through :func:`clipforge.io.atomic_write`."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda handle: image.save(handle, format=image_format))
    return path


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
    return save_figure(figure, path)


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
    return save_figure(figure, path)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]],
    classnames: Sequence[str],
    path: str | Path,
    title: str = "zero-shot classification",
) -> Path:
    """Confusion matrix: row = true class, column = predicted class.

    Each cell is coloured by its share of the row (so the diagonal reads as per-class recall, whatever the
    class sizes); counts are written in the cells up to 20 classes, class names on the axes up to 60.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    num_classes = len(classnames)
    if counts.shape != (num_classes, num_classes):
        raise ValueError(f"matrix must be {num_classes} x {num_classes} (one row per class), got {counts.shape}")
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(max(4.0, 0.3 * num_classes + 2.5), 24.0)
    figure, axis = plt.subplots(figsize=(side + 1.2, side), dpi=120)
    picture = axis.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(picture, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    if num_classes <= 60:
        positions = np.arange(num_classes)
        axis.set_xticks(positions, [str(name) for name in classnames], rotation=90, fontsize=7)
        axis.set_yticks(positions, [str(name) for name in classnames], fontsize=7)
    else:
        axis.set_xticks([])
        axis.set_yticks([])
    if num_classes <= 20:
        for row in range(num_classes):
            for column in range(num_classes):
                colour = "white" if fractions[row, column] > 0.5 else "black"
                axis.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=7, color=colour)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(f"{title}: top-1 {accuracy:.3f} on {counts.sum()} images", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_sample_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    path: str | Path,
    columns: int = 4,
    title: str = "samples",
) -> Path:
    """Images in rows of ``columns``, each with its caption (wrapped, shortened past 80 characters) below it."""
    if not images or len(images) != len(captions):
        raise ValueError(f"need one caption per image and at least one image, got {len(images)} and {len(captions)}")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)  # ceil
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.6 * rows), dpi=120, squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position >= len(images):
            continue
        axis.imshow(images[position])
        caption = captions[position] if len(captions[position]) <= 80 else captions[position][:77] + "..."
        axis.set_title("\n".join(textwrap.wrap(caption, 28)), fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def overlay_heatmap(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """``image`` with ``heatmap`` (h, w, values in [0, 1]) resized onto it, coloured, blended with ``alpha``."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    heat = np.asarray(Image.fromarray(heat, mode="F").resize(image.size, Image.Resampling.BILINEAR))
    coloured = (plt.get_cmap(colormap)(np.clip(heat, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(coloured, mode="RGB"), alpha)


def plot_explanations(rows: Sequence[Sequence[Any]], path: str | Path, names: Sequence[str] | None = None) -> Path:
    """Heat-map overlays: one row per image (the image, then one overlay per text, titled with the text).

    ``rows[i][t]`` has ``image``, ``heatmap``, ``text``, ``method`` and ``similarity`` (an ``Explanation``).
    """
    if not rows or not rows[0]:
        raise ValueError("nothing to draw: need at least one image and one text")
    columns = len(rows[0]) + 1
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.6 * len(rows)), dpi=120, squeeze=False)
    for row, explanations in enumerate(rows):
        axes[row][0].imshow(explanations[0].image)
        axes[row][0].set_title(textwrap.shorten(names[row] if names else "image", 30), fontsize=7)
        for column, explanation in enumerate(explanations, start=1):
            axes[row][column].imshow(overlay_heatmap(explanation.image, explanation.heatmap))
            label = f"{explanation.text}\ncos {explanation.similarity:+.3f}"
            axes[row][column].set_title("\n".join(textwrap.wrap(label, 30)[:3]), fontsize=7)
        for axis in axes[row]:
            axis.axis("off")
    figure.suptitle(f"heat maps ({rows[0][0].method})", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_search_results(
    query: str | Image.Image,
    images: Sequence[Image.Image],
    scores: Sequence[float],
    names: Sequence[str],
    path: str | Path,
    columns: int = 5,
) -> Path:
    """Search results in rank order, each titled ``rank: score`` and its file name; the query comes first
    (its text, or its image framed in blue)."""
    if len(images) != len(scores) or len(images) != len(names):
        raise ValueError("need one score and one name per result image")
    cells = len(images) + 1
    columns = min(columns, cells)
    rows = -(-cells // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), dpi=120, squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        axis.axis("off")
    first = axes.flat[0]
    if isinstance(query, Image.Image):
        first.axis("on")
        first.imshow(query)
        for spine in first.spines.values():
            spine.set_edgecolor("tab:blue")
            spine.set_linewidth(3)
        first.set_title("query", fontsize=8)
    else:
        first.text(0.5, 0.5, "\n".join(textwrap.wrap(f"query: {query}", 22)[:6]), ha="center", va="center", fontsize=9)
    for rank, (axis, image, score, name) in enumerate(zip(axes.flat[1:], images, scores, names, strict=False), 1):
        axis.imshow(image)
        axis.set_title(f"{rank}: {score:+.3f}\n{textwrap.shorten(name, 26, placeholder='...')}", fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_class_probabilities(
    images: Sequence[Image.Image],
    names: Sequence[str],
    classnames: Sequence[str],
    probabilities: np.ndarray,
    path: str | Path,
    top: int = 10,
) -> Path:
    """One row per image: the image, then a bar chart of its ``top`` most probable classes."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(images), len(classnames)) or len(names) != len(images):
        raise ValueError(f"probabilities must be (images, classes) = ({len(images)}, {len(classnames)})")
    top = min(top, len(classnames))
    figure, axes = plt.subplots(
        len(images),
        2,
        figsize=(7.5, 0.25 * top * len(images) + 1.2 * len(images)),
        dpi=120,
        squeeze=False,
        gridspec_kw={"width_ratios": [1, 2.5]},
    )
    for row, (image, name, values) in enumerate(zip(images, names, probabilities, strict=True)):
        axes[row][0].imshow(image)
        axes[row][0].axis("off")
        axes[row][0].set_title(textwrap.shorten(name, 30, placeholder="..."), fontsize=7)
        order = np.argsort(-values, kind="stable")[:top][::-1]  # best on top
        bars = axes[row][1]
        bars.barh([classnames[c] for c in order], values[order], color="tab:blue")
        bars.set_xlim(0, 1)
        bars.tick_params(labelsize=7)
        for position, c in enumerate(order):
            bars.text(min(values[c] + 0.01, 0.9), position, f"{values[c]:.2f}", va="center", fontsize=7)
    axes[-1][1].set_xlabel("probability")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_metric_bars(
    rows: Sequence[tuple[str, str, float]], path: str | Path, title: str = "evaluation suite", replace: bool = False
) -> Path:
    """Horizontal bars, one per ``(label, metric, value)`` row (values in [0, 1]; NaN drawn as an empty bar), the
    metric's name and value written beside each bar. ``replace``: the caller owns ``path`` (a suite's summary)."""
    height = min(max(2.0, 0.35 * len(rows) + 1.2), 40.0)
    figure, axis = plt.subplots(figsize=(8.0, height), dpi=120)
    values = [0.0 if np.isnan(value) else value for _, _, value in rows]
    positions = np.arange(len(rows))[::-1]
    axis.barh(positions, values, color="#4C72B0")
    for position, (_, metric, value) in zip(positions, rows, strict=True):
        shown = "nan" if np.isnan(value) else f"{value:.3f}"
        axis.text(min(max(value, 0.0), 1.0) + 0.01 if not np.isnan(value) else 0.01, position, f"{metric} {shown}",
                  va="center", fontsize=7)  # fmt: skip
    axis.set_yticks(positions, [label for label, _, _ in rows], fontsize=7)
    axis.set_xlim(0.0, 1.3)
    axis.set_xlabel("metric value")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, replace=replace)


def plot_tradeoff_curve(
    alphas: Sequence[float],
    retained: Sequence[float],
    target: Sequence[float],
    path: str | Path,
    retained_label: str = "retained",
    target_label: str = "target",
) -> Path:
    """The WiSE-FT curve: one point per interpolation ``alpha`` at (retained metric, target metric), joined in
    order of alpha and labelled with it (alpha 0: the model before fine-tuning, 1: the fine-tune)."""
    figure, axis = plt.subplots(figsize=(6, 4.5), dpi=120)
    axis.plot(retained, target, "-o", color="tab:blue", markersize=4)
    for alpha, x, y in zip(alphas, retained, target, strict=True):
        axis.annotate(f"{alpha:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axis.set_xlabel(retained_label)
    axis.set_ylabel(target_label)
    axis.set_title("weight-space interpolation (labels: alpha)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)
