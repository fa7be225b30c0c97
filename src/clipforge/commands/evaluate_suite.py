"""``clipforge eval --suite FILE|NAME --out-dir FOLDER``: every dataset of a suite against one checkpoint.

Each entry runs as ``clipforge eval`` with the same fields would (:func:`clipforge.eval.tasks.run_task`), prints
its table and writes its CLIP_benchmark JSON into the folder; an entry whose JSON is there already is read, not run
again (``--overwrite`` runs it again and replaces the file). At the end one table of every entry is printed and
``summary.csv`` rewritten (``--plot``: also a bar chart, ``summary.png`` by default). The folder is held with
its writer lock for the whole suite.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clipforge.commands.common import check_picture_path
from clipforge.config import ConfigError
from clipforge.io import check_output, current_policy

logger = logging.getLogger("clipforge")


def run_suite(args: argparse.Namespace) -> list[dict]:
    """Run the suite ``args.suite`` into ``args.out_dir``; returns the records of every entry, in suite order."""
    from clipforge.eval.results import (
        BENCHMARK_TASKS,
        benchmark_record,
        format_results_table,
        model_label,
        write_results_json,
    )
    from clipforge.eval.suite import (
        SUMMARY_PICTURE,
        format_summary_table,
        headline,
        load_suite,
        read_record,
        record_path,
        write_summary,
    )
    from clipforge.eval.tasks import run_task
    from clipforge.folders import folder_lock
    from clipforge.interop.load import from_pretrained
    from clipforge.runtime import inference_autocast, resolve_device

    if args.out_dir is None:
        raise ConfigError("--suite writes one results JSON per dataset: give --out-dir FOLDER (a dataset whose JSON "
                          "is there already is not run again)")  # fmt: skip
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be positive")
    given = [
        flag for flag in ("--templates", "--classnames", "--train-data", "--val-data", "--shots") if _set(args, flag)
    ]
    if given:
        raise ConfigError(f"{given[0]} applies to one dataset; with --suite, set it on the suite's entry")
    suite = load_suite(args.suite)
    folder = Path(args.out_dir)
    picture = None
    if args.plot is not None:
        picture = Path(args.plot) if args.plot else folder / SUMMARY_PICTURE
        check_picture_path(picture, "--plot")
        if args.plot:
            check_output(picture, what="--plot")
    device = resolve_device(args.device, "--device")
    loaded = from_pretrained(args.checkpoint, device, args.weights)
    autocast = inference_autocast(device, loaded.config.train.precision)
    model, pretrained = model_label(loaded.config.model), str(args.checkpoint)
    records: list[dict] = []
    resumed: set[int] = set()
    with folder_lock(folder, "eval"):
        for task, names in zip(suite.tasks, suite.fields, strict=True):
            stub = {"dataset": task.name, "model": model, "pretrained": pretrained, "language": args.language}
            shots = {"fewshot_k": task.shots} if task.shots else {}
            path = record_path(folder, {**stub, "task": BENCHMARK_TASKS[task.task], "metrics": shots})
            if path.exists() and not current_policy().overwrite:
                resumed.add(len(records))
                records.append(read_record(path))
                print(f"{task.name} ({task.task}): finished before, read {path}")
                continue
            done = run_task(
                loaded.model, loaded.processor, task, args.batch_size, autocast, ties=args.ties, names=names
            )
            print(format_results_table(done.result, done.dataset, pretrained))
            record = benchmark_record(done.result, done.dataset, model, pretrained, args.language)
            print(f"wrote {write_results_json(path, record)}")
            records.append(record)
        print(f"\n{suite.origin}: {len(records)} datasets, {pretrained} ({model}), ties: {args.ties}")
        print(format_summary_table(records, resumed))
        print(f"wrote {write_summary(folder, records)}")
        if picture is not None:
            from clipforge.viz import plot_metric_bars

            rows = [(f"{r['dataset']} ({r['task']})", *headline(r)[0]) for r in records if headline(r)]
            owned = not args.plot  # the folder's own summary.png is rewritten; a named picture obeys --overwrite
            print(f"wrote {plot_metric_bars(rows, picture, title=f'{suite.origin}: {pretrained}', replace=owned)}")
    return records


def _set(args: argparse.Namespace, flag: str) -> bool:
    return getattr(args, flag.removeprefix("--").replace("-", "_"), None) is not None
