"""``clipforge eval``: one checkpoint, one task, one dataset -> a printed table, a results JSON, a picture.

Every mistake in the input (a missing checkpoint, a dataset that does not fit the task, an unknown template
set) is raised as ``ConfigError``/``CheckpointError`` naming the flag to fix, which the command line prints
without a stack trace.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    DEVICE_HELP,
    add_input,
    add_output,
    add_weights_option,
    check_picture_path,
)
from clipforge.commands.data_spec import parse_data_spec
from clipforge.config import ConfigError, DataConfig
from clipforge.io import check_output

if TYPE_CHECKING:
    from clipforge.data.base import ImageTextSource
    from clipforge.eval.runner import EvalResult

logger = logging.getLogger("clipforge")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="zero-shot classification or retrieval of a checkpoint on local data")
    add_input(parser, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(parser)
    parser.add_argument("--task", required=True, choices=["zeroshot", "retrieval"])
    add_input(
        parser,
        "--data",
        kind="data",
        required=True,
        nargs="+",
        metavar="YAML|KEY=VALUE",
        help="a YAML file with a data section, and/or data fields, e.g. kind=manifest path=test.csv split=test",
    )
    add_input(
        parser,
        "--templates",
        kind="path",
        default="simple",
        help="zero-shot prompts: a named set (simple, openai-imagenet, cifar10 ...), one template with {}, "
        "or a JSON file (file.json, or file.json:dataset)",
    )
    add_input(
        parser,
        "--classnames",
        default=None,
        help="zero-shot class names in label order (.txt, one per line, or .json); default: the dataset's own",
    )
    add_output(parser, "--out", default=None, help="write the results JSON (CLIP_benchmark layout) here")
    add_output(
        parser,
        "--plot",
        kind="picture",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw a confusion matrix (zeroshot) or caption queries with their top-5 images (retrieval); "
        "without a file name: --out with .png",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images or prompts per forward pass")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_eval(
        args.checkpoint,
        args.task,
        args.data,
        templates=args.templates,
        classnames=args.classnames,
        out=args.out,
        plot=args.plot,
        batch_size=args.batch_size,
        device=args.device,
        weights=args.weights,
    )


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
    weights: str = "raw",
) -> EvalResult:
    """Evaluate ``checkpoint`` on the dataset ``data`` describes (see :func:`parse_data_spec`), print a table.

    ``classnames``: a file of class names for a zero-shot task (see ``classnames_from_file``); None = the
    source's own. ``out``: also write the CLIP_benchmark JSON there. ``plot``: also draw a PNG there (a confusion matrix for
    ``zeroshot``, the top-5 images of a few caption queries for ``retrieval``); ``""`` picks the name
    (``out`` with ``.png``, else ``confusion_matrix.png`` / ``retrieval_grid.png``). ``weights``: ``raw`` or ``ema``
    (the checkpoint's moving average of its weights).
    """
    from clipforge.eval.runner import (
        dataset_label,
        evaluate_retrieval,
        evaluate_zeroshot,
        format_results_table,
        open_eval_source,
        write_results_json,
    )
    from clipforge.interop.load import from_pretrained
    from clipforge.runtime import inference_autocast, resolve_device

    data_config = parse_data_spec(data)
    plot_path = _plot_path(plot, out, task) if plot is not None else None
    if plot_path is not None:  # a picture named after --out: checked now, not after the evaluation's work
        check_output(check_picture_path(plot_path, "--plot"), what="--plot")
        if out is not None and Path(out).resolve() == plot_path.resolve():
            raise ConfigError(f"--out and --plot both name {out}: give the picture another name")
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be positive")
    torch_device = resolve_device(device, "--device")
    loaded = from_pretrained(checkpoint, torch_device, weights)
    try:
        source = open_eval_source(data_config)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"--data: {error}") from error
    dataset = dataset_label(data_config)
    autocast = inference_autocast(torch_device, loaded.config.train.precision)
    try:
        if task == "zeroshot":
            names, templates_list = _zeroshot_inputs(source, data_config, templates, classnames, dataset)
            result = evaluate_zeroshot(
                loaded.model,
                loaded.processor,
                source,
                names,
                templates_list,
                batch_size,
                autocast,
                data_config.num_workers,
            )
        else:
            result = evaluate_retrieval(
                loaded.model, loaded.processor, source, batch_size, autocast, data_config.num_workers
            )
    except ConfigError:
        raise
    except ValueError as error:  # the data cannot be evaluated (e.g. no readable image): say so, plainly
        raise ConfigError(f"evaluating {checkpoint} on {dataset}: {error}") from error
    for bad in result.skipped[:5]:
        logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
    print(format_results_table(result, dataset, str(checkpoint)))
    if out is not None:
        print(f"wrote {write_results_json(out, result, dataset, str(checkpoint))}")
    if plot_path is not None:
        print(f"wrote {_plot(result, source, plot_path)}")
    return result


def _zeroshot_inputs(
    source: ImageTextSource, data_config: DataConfig, templates: str, classnames: str | None, dataset: str
) -> tuple[list[str] | None, list[str]]:
    """(class names or None = the source's own, prompt templates) for a zero-shot task; each flag's mistake
    becomes a ConfigError naming that flag."""
    from clipforge.eval.runner import classification_targets, classnames_from_file
    from clipforge.eval.templates import get_templates

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
    return names, templates_list


def _plot_path(plot: str | Path, out: str | Path | None, task: str) -> Path:
    if str(plot):
        return Path(plot)
    if out is not None:
        return Path(out).with_suffix(".png")
    return Path("confusion_matrix.png" if task == "zeroshot" else "retrieval_grid.png")


def _plot(result: EvalResult, source: ImageTextSource, path: Path) -> Path:
    from clipforge.eval.runner import plot_retrieval_examples
    from clipforge.viz import plot_confusion_matrix

    if result.task == "zeroshot":
        return plot_confusion_matrix(result.confusion_matrix, result.classnames, path)
    return plot_retrieval_examples(result, source, path)
