"""``clipforge eval``: one checkpoint, one task, one dataset -> a printed table, a results JSON, a picture.

Every mistake in the input (a missing checkpoint, a dataset that does not fit the task, an unknown template
set) is raised as ``ConfigError``/``CheckpointError`` naming the flag to fix, which the command line prints
without a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from clipforge.config import ConfigError, DataConfig, data_config_from_dict
from clipforge.data.sources import ImageTextSource
from clipforge.eval.runner import (
    EvalResult,
    classification_targets,
    classnames_from_file,
    dataset_label,
    evaluate_retrieval,
    evaluate_zeroshot,
    format_results_table,
    open_eval_source,
    write_results_json,
)
from clipforge.eval.templates import get_templates
from clipforge.train.checkpoint import load_checkpoint
from clipforge.train.loop import autocast_context, resolve_device
from clipforge.viz import plot_confusion_matrix, plot_retrieval_grid

logger = logging.getLogger("clipforge")


def parse_data_spec(items: Sequence[str]) -> DataConfig:
    """``--data`` -> a validated :class:`DataConfig`.

    ``items`` is either ``key=value`` pairs (``kind=manifest path=test.csv split=test``; dotted keys such as
    ``augment.scale_min=1`` reach nested fields), or a YAML file first, then optional ``key=value`` pairs that
    override it. The YAML holds the data fields at its top level, or a ``data:`` section (a run config works:
    its ``data`` section is used). Paths inside are read as given, relative to the working directory, as in
    run configs.
    """
    items = list(items)
    values: dict = {}
    if items and "=" not in items[0]:
        path = Path(items.pop(0))
        if not path.is_file():
            raise ConfigError(
                f"--data {str(path)!r} is neither a YAML file nor key=value; pass a file holding a data section, "
                "or pairs such as kind=manifest path=test.csv split=test"
            )
        loaded = yaml.safe_load(path.read_text())
        if isinstance(loaded, dict) and isinstance(loaded.get("data"), dict):
            loaded = loaded["data"]
        if not isinstance(loaded, dict):
            raise ConfigError(f"--data {path}: expected a mapping of data fields (kind, path, split ...)")
        values = loaded
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--data {item!r}: after the YAML file, only key=value pairs can follow")
    try:
        return data_config_from_dict(values, items, prefix="data")
    except ConfigError as error:
        raise ConfigError(f"--data: {error}") from error


def _eval_autocast(device: torch.device, precision: str):
    # The model's own training precision; fp16 autocast is a CUDA feature, so on the CPU it evaluates in fp32.
    if precision == "fp16" and device.type != "cuda":
        precision = "fp32"
    return autocast_context(device, precision)


def run_eval(
    checkpoint: str | Path,
    task: Literal["zeroshot", "retrieval"],
    data: Sequence[str],
    templates: str = "simple",
    classnames: str | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
) -> EvalResult:
    """Evaluate ``checkpoint`` on the dataset ``data`` describes (see :func:`parse_data_spec`), print a table.

    ``classnames``: a file of class names for a zero-shot task (see ``classnames_from_file``); None = the
    source's own. ``out``: also write the CLIP_benchmark JSON there. ``plot``: also draw a PNG there (a confusion matrix for
    ``zeroshot``, the top-5 images of a few caption queries for ``retrieval``); ``""`` picks the name
    (``out`` with ``.png``, else ``confusion_matrix.png`` / ``retrieval_grid.png``).
    """
    data_config = parse_data_spec(data)
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be positive")
    torch_device = resolve_device(device)
    loaded = load_checkpoint(checkpoint, torch_device)
    try:
        source = open_eval_source(data_config)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"--data: {error}") from error
    dataset = dataset_label(data_config)
    names = None
    if task == "zeroshot":
        try:
            templates_list = get_templates(templates)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"--templates: {error}") from error
        try:
            names = classnames_from_file(source, classnames, data_config.kind) if classnames else None
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"--classnames: {error}") from error
        try:
            classification_targets(source, names)
        except ValueError as error:
            raise ConfigError(f"--task zeroshot on {dataset}: {error}") from error
    autocast = _eval_autocast(torch_device, loaded.config.train.precision)
    try:
        if task == "zeroshot":
            result = evaluate_zeroshot(
                loaded.model,
                loaded.tokenizer,
                loaded.config,
                source,
                names,
                templates_list,
                batch_size,
                autocast,
                data_config.num_workers,
            )
        else:
            result = evaluate_retrieval(
                loaded.model, loaded.tokenizer, loaded.config, source, batch_size, autocast, data_config.num_workers
            )
    except ValueError as error:  # the data cannot be evaluated (e.g. no readable image): say so, plainly
        raise ConfigError(f"evaluating {checkpoint} on {dataset}: {error}") from error
    for bad in result.skipped[:5]:
        logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
    print(format_results_table(result, dataset, str(checkpoint)))
    if out is not None:
        print(f"wrote {write_results_json(out, result, dataset, str(checkpoint))}")
    if plot is not None:
        print(f"wrote {_plot(result, source, _plot_path(plot, out, task))}")
    return result


def _plot_path(plot: str | Path, out: str | Path | None, task: str) -> Path:
    if str(plot):
        return Path(plot)
    if out is not None:
        return Path(out).with_suffix(".png")
    return Path("confusion_matrix.png" if task == "zeroshot" else "retrieval_grid.png")


def _plot(result: EvalResult, source: ImageTextSource, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if result.task == "zeroshot":
        return plot_confusion_matrix(result.confusion_matrix, result.classnames, path)
    return plot_retrieval_examples(result, source, path)


def plot_retrieval_examples(
    result: EvalResult, source: ImageTextSource, path: str | Path, queries: int = 8, top: int = 5
) -> Path:
    """Draw ``queries`` caption queries, evenly spread over the caption list, with their ``top`` images.

    Only the chosen queries are scored (queries x N_img), never the full caption x image matrix.
    """
    found = result.embeddings
    picks = np.unique(np.linspace(0, len(found.captions) - 1, min(queries, len(found.captions))).round().astype(int))
    scores = found.text_features[torch.as_tensor(picks)] @ found.image_features.T  # (queries, N_img)
    best = scores.topk(min(top, scores.shape[1]), dim=1)
    rows, hits = [], []
    for query, image_rows in zip(picks, best.indices.tolist(), strict=True):
        rows.append([source.load_image(int(found.image_indices[row])) for row in image_rows])
        hits.append([row == int(found.text_to_image[query]) for row in image_rows])
    texts = [found.captions[query] for query in picks]
    return plot_retrieval_grid(texts, rows, hits, best.values.tolist(), path, title=f"text -> image: top {top}")
