"""``clipforge eval``: one checkpoint, one task, one dataset -> a printed table, a results JSON, a picture; or a
suite of datasets (``--suite``) -> one JSON each in a folder and one table.

Every mistake in the input (a missing checkpoint, a dataset that does not fit the task, an unknown template
set) is raised as ``ConfigError``/``CheckpointError`` naming the flag to fix, which the command line prints
without a stack trace.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
from clipforge.config.choices import EVAL_TASKS, TIE_RULES
from clipforge.io import check_output

if TYPE_CHECKING:
    from clipforge.data.base import ImageTextSource
    from clipforge.eval.results import EvalResult

logger = logging.getLogger("clipforge")

DATA_HELP = "a YAML file with a data section, and/or data fields, e.g. kind=manifest path=test.csv split=test"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="zero-shot classification, retrieval or a linear probe of a checkpoint on local data, or a suite",
    )
    add_input(parser, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    what = parser.add_mutually_exclusive_group(required=True)  # one task on --data, or a suite of them
    what.add_argument("--task", choices=EVAL_TASKS, help="what to measure on --data")
    add_input(parser, "--data", kind="data", nargs="+", metavar="YAML|KEY=VALUE", help=f"the test data: {DATA_HELP}")
    add_weights_option(parser)
    add_input(
        what,
        "--suite",
        kind="path",
        metavar="FILE|NAME",
        help="run every dataset of a suite (a YAML file with a datasets list, or a shipped suite: offline) into "
        "--out-dir; datasets whose results are there already are skipped",
    )
    add_input(
        parser,
        "--templates",
        kind="path",
        default=None,
        help="zero-shot prompts: a named set (simple, openai-imagenet, cifar10 ...), one template with {}, or a JSON "
        "file (file.json, or file.json:dataset); default: the data's own templates file, else simple",
    )
    add_input(
        parser,
        "--classnames",
        default=None,
        help="zero-shot class names in label order (.txt, one per line, .json, or file.json:dataset in "
        "CLIP_benchmark's layout); default: the dataset's own",
    )
    probe = parser.add_argument_group("linear probes (--task linear_probe | fewshot)")
    add_input(
        probe,
        "--train-data",
        kind="data",
        nargs="+",
        metavar="YAML|KEY=VALUE",
        help="the training images: fields over --data's (e.g. split=train) or a data section of their own; "
        "default: --data with split=train",
    )
    add_input(
        probe,
        "--val-data",
        kind="data",
        nargs="+",
        metavar="YAML|KEY=VALUE",
        help="validation images to choose the regularisation on (fields over --data's); default: a random "
        "--val-proportion of the training images",
    )
    probe.add_argument("--val-proportion", type=float, default=0.2, help="share of training images held out (0.2)")
    probe.add_argument("--shots", type=int, default=None, help="fewshot: training images per class")
    probe.add_argument("--seed", type=int, default=0, help="the validation split and the few-shot draw (0)")
    parser.add_argument(
        "--ties",
        choices=TIE_RULES,
        default="pessimistic",
        help="a correct answer tied with a wrong one: pessimistic counts it behind (default), index ranks the lower "
        "index first (CLIP_benchmark's reading)",
    )
    parser.add_argument("--language", default="en", help="the prompts' language, recorded in the JSON (en)")
    add_output(parser, "--out", default=None, help="write the results JSON (CLIP_benchmark layout) here")
    add_output(
        parser,
        "--out-dir",
        kind="folder",
        default=None,
        help="a results folder: the JSON named as CLIP_benchmark names it, and with --suite summary.csv",
    )
    add_output(
        parser,
        "--plot",
        kind="picture",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw a confusion matrix (zeroshot, probes), caption queries with their top-5 images (retrieval) or "
        "the suite's metrics; without a file name: --out with .png (--out-dir: the JSON's name, summary.png)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images or prompts per forward pass")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.out_dir is not None:
        from clipforge.eval.suite import check_results_folder

        check_results_folder(Path(args.out_dir))
    if args.suite is not None:
        from clipforge.commands.evaluate_suite import run_suite

        given = [flag for flag, value in (("--data", args.data), ("--out", args.out)) if value]
        if given:
            raise ConfigError(f"--suite names its own data and writes into --out-dir; remove {given[0]}")
        run_suite(args)
        return
    if not args.data:
        raise ConfigError(f"--task {args.task} needs --data: the test data, e.g. kind=manifest path=test.csv")
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
        train_data=args.train_data,
        val_data=args.val_data,
        val_proportion=args.val_proportion,
        shots=args.shots,
        seed=args.seed,
        ties=args.ties,
        language=args.language,
        out_dir=args.out_dir,
        weights=args.weights,
    )


def over_data(data: Sequence[str], more: Sequence[str] | None, flag: str) -> DataConfig | None:
    """``--train-data``/``--val-data``: ``key=value`` fields over ``--data``'s, or a spec of their own (a YAML)."""
    if not more:
        return None
    return parse_data_spec([*data, *more] if "=" in more[0] else more, flag)


def run_eval(
    checkpoint: str | Path,
    task: str,
    data: Sequence[str],
    templates: str | None = None,
    classnames: str | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    *,
    train_data: Sequence[str] | None = None,
    val_data: Sequence[str] | None = None,
    val_proportion: float = 0.2,
    shots: int | None = None,
    seed: int = 0,
    ties: str = "pessimistic",
    language: str = "en",
    out_dir: str | Path | None = None,
    weights: str = "raw",
) -> EvalResult:
    """Evaluate ``checkpoint`` on the dataset ``data`` describes (see :func:`parse_data_spec`), print a table.

    ``task``: zeroshot, retrieval, linear_probe or fewshot (:class:`~clipforge.eval.tasks.EvalTask` says what each
    of the other arguments means). ``out``: also write the CLIP_benchmark JSON there; ``out_dir``: into that
    folder, named as CLIP_benchmark names it. ``plot``: also draw a PNG there (a confusion matrix for zero-shot and
    probes, the top-5 images of a few caption queries for retrieval); ``""`` picks the name (the JSON's with
    ``.png``, else ``confusion_matrix.png`` / ``retrieval_grid.png``). ``weights``: ``raw`` or ``ema`` (the checkpoint's moving
    average of its weights).
    """
    from clipforge.eval.results import benchmark_record, format_results_table, model_label, write_results_json
    from clipforge.eval.tasks import EvalTask, check_task, run_task
    from clipforge.interop.load import from_pretrained
    from clipforge.runtime import inference_autocast, resolve_device

    evaluation = EvalTask(
        task,
        parse_data_spec(data),
        templates=templates,
        classnames=classnames,
        train_data=over_data(data, train_data, "--train-data"),
        val_data=over_data(data, val_data, "--val-data"),
        val_proportion=val_proportion,
        shots=shots,
        seed=seed,
    )
    check_task(evaluation)
    if batch_size < 1:
        raise ConfigError(f"--batch-size={batch_size} must be positive")
    plot_path = None
    if plot is not None and (str(plot) or not out_dir):  # checked now, not after the evaluation's work
        plot_path = _plot_path(plot, out, task)
        _check_plot(plot_path, out)
    torch_device = resolve_device(device, "--device")
    loaded = from_pretrained(checkpoint, torch_device, weights)
    autocast = inference_autocast(torch_device, loaded.config.train.precision)
    done = run_task(loaded.model, loaded.processor, evaluation, batch_size, autocast, ties=ties)
    result = done.result
    for bad in result.skipped[:5]:
        logger.warning("skipped unreadable image %s: %s", bad.where, bad.reason)
    print(format_results_table(result, done.dataset, str(checkpoint)))
    record = benchmark_record(result, done.dataset, model_label(loaded.config.model), str(checkpoint), language)
    if out is not None:
        print(f"wrote {write_results_json(out, record)}")
    if out_dir is not None:
        from clipforge.eval.suite import record_path
        from clipforge.folders import folder_lock

        with folder_lock(out_dir, "eval"):  # a suite may be writing into the same results folder
            written = write_results_json(record_path(Path(out_dir), record), record)
        print(f"wrote {written}")
        if plot is not None and plot_path is None:  # named after the JSON, beside it
            plot_path = written.with_suffix(".png")
            _check_plot(plot_path, out)
    if plot_path is not None:
        print(f"wrote {_plot(result, done.source, plot_path)}")
    return result


def _check_plot(plot_path: Path, out: str | Path | None) -> None:
    check_output(check_picture_path(plot_path, "--plot"), what="--plot")
    if out is not None and Path(out).resolve() == plot_path.resolve():
        raise ConfigError(f"--out and --plot both name {out}: give the picture another name")


def _plot_path(plot: str | Path, out: str | Path | None, task: str) -> Path:
    if str(plot):
        return Path(plot)
    if out is not None:
        return Path(out).with_suffix(".png")
    return Path("retrieval_grid.png" if task == "retrieval" else "confusion_matrix.png")


def _plot(result: EvalResult, source: ImageTextSource, path: Path) -> Path:
    from clipforge.eval.runner import plot_retrieval_examples
    from clipforge.viz import plot_confusion_matrix

    if result.task == "retrieval":
        return plot_retrieval_examples(result, source, path)
    title = "zero-shot classification" if result.task == "zeroshot" else "linear probe"
    return plot_confusion_matrix(result.confusion_matrix, result.classnames, path, title=title)
