"""Suites: many datasets, one model, one folder of results and one table; a finished dataset is not run again.

A suite is a YAML file (or the name of a shipped one, :data:`NAMED_SUITES`)::

    datasets:
      - name: stl10                      # the dataset's name in the results (default: kind:path:split)
        task: zeroshot                   # zeroshot | retrieval | linear_probe | fewshot
        data: {kind: torchvision, name: STL10, path: data/stl10, split: test}
        templates: stl10                 # zero-shot only, optional; classnames: too
      - name: coco
        task: retrieval
        data: {kind: coco, path: data/coco/annotations/captions_val2017.json}
      - name: stl10
        task: fewshot
        shots: 10                        # fewshot only
        data: {kind: torchvision, name: STL10, path: data/stl10, split: test}
        train_data: {split: train}       # fields over data's (another kind: a new section); default split: train

Paths are read as given, relative to the working directory, as in run configs. Each entry is an
:class:`~clipforge.eval.tasks.EvalTask` and runs exactly as ``clipforge eval`` with the same flags would.

Results folder: every entry's CLIP_benchmark JSON is written as ``results_file_name(record)`` (CLIP_benchmark's
own ``{dataset}_{pretrained}_{model}_{language}_{task}.json``), so ``clip_benchmark build FOLDER`` reads them all;
an entry whose file is there already is skipped and its file read instead (resuming an interrupted suite), and
``summary.csv`` (the CSV ``clip_benchmark build`` makes of the suite's results) is rewritten at the end.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from clipforge.config import ConfigError, DataConfig, data_config_from_dict
from clipforge.config.parsing import read_yaml
from clipforge.eval.probe import DEFAULT_VAL_PROPORTION
from clipforge.eval.results import dataset_label, results_file_name
from clipforge.eval.tasks import EvalTask, FieldNames, check_task
from clipforge.io import atomic_write_text, shorten, shown

SUMMARY_CSV = "summary.csv"
SUMMARY_PICTURE = "summary.png"
# the metrics the printed table and the picture show, per task (summary.csv holds all of them)
HEADLINE_METRICS = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "zeroshot_retrieval": ("image_retrieval_recall@5", "text_retrieval_recall@5"),
    "linear_probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
}
_ENTRY_KEYS = (
    "name",
    "task",
    "data",
    "templates",
    "classnames",
    "train_data",
    "val_data",
    "val_proportion",
    "shots",
    "seed",
)
_RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def _offline_suite() -> dict[str, Any]:
    """Data shipped inside clipforge: retrieval on the emoji and icon test splits, zero-shot and a linear probe on
    the Fashion-MNIST subsets (2,000 training and 2,000 test images)."""
    fashion = files("clipforge.data") / "fashion_mnist"
    test = {"kind": "idx", "path": str(fashion / "t10k-images-idx3-ubyte.gz"), "classnames": "fashion-mnist"}
    return {
        "datasets": [
            {"name": "emoji", "task": "retrieval", "data": {"kind": "emoji", "split": "test"}},
            {"name": "icons", "task": "retrieval", "data": {"kind": "corpus", "name": "icons", "split": "test"}},
            {"name": "fashion-mnist", "task": "zeroshot", "data": test, "templates": "fashion-mnist"},
            {
                "name": "fashion-mnist",
                "task": "linear_probe",
                "data": test,
                "train_data": {"path": str(fashion / "train-images-idx3-ubyte.gz")},
            },
        ]
    }


NAMED_SUITES: dict[str, Callable[[], dict[str, Any]]] = {"offline": _offline_suite}


@dataclass
class Suite:
    """The entries of a suite, and where they came from (a file or a name), for messages."""

    origin: str
    tasks: list[EvalTask]
    fields: list[FieldNames]


def load_suite(spec: str) -> Suite:
    """The suite ``spec`` names: a shipped suite (:data:`NAMED_SUITES`) or a YAML file (module docstring).
    ConfigError naming the entry and key for every mistake, before any data is opened."""
    if spec in NAMED_SUITES:
        return suite_from_dict(NAMED_SUITES[spec](), spec)
    if not Path(spec).is_file():
        raise ConfigError(
            f"--suite {shorten(spec, 200)!r} is neither a suite file (YAML with a datasets list) nor a shipped suite "
            f"({', '.join(NAMED_SUITES)})"
        )
    return suite_from_dict(read_yaml(spec), shorten(spec, 200))


def suite_from_dict(values: Any, origin: str) -> Suite:
    entries = values.get("datasets") if isinstance(values, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{origin}: expected a mapping with a non-empty 'datasets' list (name, task, data ...)")
    tasks, names, seen = [], [], set()
    for position, entry in enumerate(entries):
        where = f"{origin}: datasets[{position}]"
        task, fields = _entry(entry, where)
        key = (task.name, task.task)
        if key in seen:
            raise ConfigError(f"{where}: {task.name!r} with task {task.task} is listed twice; give it another name")
        seen.add(key)
        tasks.append(task)
        names.append(fields)
    return Suite(origin, tasks, names)


def _entry(entry: Any, where: str) -> tuple[EvalTask, FieldNames]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping (name, task, data ...), got {shown(entry)}")
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; an entry takes {list(_ENTRY_KEYS)}")
    fields = FieldNames(**{name: f"{where}.{name}" for name in FieldNames.__dataclass_fields__})
    if not isinstance(entry.get("data"), dict):
        raise ConfigError(f"{where}.data: expected a data section (kind, path, split ...)")
    data = data_config_from_dict(entry["data"], prefix=f"{where}.data")
    train = _section_over(entry, "train_data", where)
    validation = _section_over(entry, "val_data", where)
    task = EvalTask(
        task=str(entry.get("task", "")),
        data=data,
        name=str(entry.get("name") or ""),
        templates=entry.get("templates"),
        classnames=entry.get("classnames"),
        train_data=train,
        val_data=validation,
        val_proportion=_number(entry, "val_proportion", DEFAULT_VAL_PROPORTION, float, where),
        shots=_number(entry, "shots", None, int, where),
        seed=_number(entry, "seed", 0, int, where),
    )
    check_task(task, fields)
    if not task.name:
        task.name = dataset_label(data)
    return task, fields


def _section_over(entry: dict, key: str, where: str) -> DataConfig | None:
    """``entry[key]``: a data section's fields over ``entry['data']``'s (one that names another kind stands alone)."""
    values = entry.get(key)
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ConfigError(
            f"{where}.{key}: expected data fields over data's (e.g. {{split: train}}), got {shown(values)}"
        )
    base = dict(entry["data"])
    merged = dict(values) if values.get("kind", base.get("kind")) != base.get("kind") else {**base, **values}
    return data_config_from_dict(merged, prefix=f"{where}.{key}")


def _number(entry: dict, key: str, default: Any, kind: type, where: str) -> Any:
    value = entry.get(key, default)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{where}.{key}={shown(value)}: expected {'an integer' if kind is int else 'a number'}")


# ----------------------------------------------------------------------------------------------
# The results folder
# ----------------------------------------------------------------------------------------------
def check_results_folder(folder: Path, flag: str = "--out-dir") -> None:
    """Refuse a folder that holds anything but results: CLIP_benchmark JSON files, their pictures (a ``.png``
    named as a ``.json`` beside it), ``summary.csv``/``summary.png`` and clipforge's own dot files (its lock and
    temporaries). Writing results among other files would mix them with someone's data."""
    if not folder.is_dir():
        return
    names = [entry.name for entry in folder.iterdir()]
    stems = {Path(name).stem for name in names if name.endswith(".json")}
    foreign = [
        name
        for name in sorted(names)
        if not name.startswith(".")
        and not name.endswith(".json")
        and name not in (SUMMARY_CSV, SUMMARY_PICTURE)
        and not (name.endswith(".png") and Path(name).stem in stems)
    ]
    if foreign:
        raise ConfigError(
            f"{flag} {shorten(str(folder), 200)} holds files that are not evaluation results ({', '.join(foreign[:3])}"
            f"{' ...' if len(foreign) > 3 else ''}); name a new or empty folder, or one holding only results"
        )


def read_record(path: Path) -> dict[str, Any]:
    """A results JSON written before (a finished suite entry); ConfigError when it is not one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable results file ({error}); remove it to run its dataset again"
        ) from None
    if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS):
        raise ConfigError(
            f"{path} lacks CLIP_benchmark's keys {list(_RECORD_KEYS)}; remove it to run its dataset again"
        )
    return record


def record_path(folder: Path, record: dict[str, Any]) -> Path:
    return folder / results_file_name(record)


def summary_csv(records: list[dict[str, Any]]) -> str:
    """The CSV ``clip_benchmark build`` makes of these records: one row each, the metrics and the record's other
    keys as columns, plus ``model_fullname`` (model and pretrained); columns in first-seen order."""
    rows, columns = [], {}
    for record in records:
        row = {**record["metrics"], **{key: value for key, value in record.items() if key != "metrics"}}
        row["model_fullname"] = f"{record['model']} {record['pretrained']}"
        columns.update(dict.fromkeys(row))
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_summary(folder: Path, records: list[dict[str, Any]]) -> Path:
    """``summary.csv`` in ``folder``, replaced: the folder's own file, rewritten after every suite run."""
    return atomic_write_text(folder / SUMMARY_CSV, summary_csv(records), replace=True)


def headline(record: dict[str, Any]) -> list[tuple[str, float]]:
    """(metric, value) of the record's headline metrics (:data:`HEADLINE_METRICS`), those it has."""
    wanted = HEADLINE_METRICS.get(record["task"], ())
    return [(key, float(record["metrics"][key])) for key in wanted if key in record["metrics"]]


def format_summary_table(records: list[dict[str, Any]], resumed: set[int] | None = None) -> str:
    """One table of every record's headline metrics: a row per (dataset, task, metric); ``resumed``: the positions
    of records read from an earlier run (marked ``*``)."""
    resumed = resumed or set()
    rows = [("dataset", "task", "metric", "value")]
    for position, record in enumerate(records):
        mark = " *" if position in resumed else ""
        for line, (key, value) in enumerate(headline(record)):
            first = line == 0
            shown_value = "nan" if math.isnan(value) else f"{value:.4f}"
            rows.append(
                (f"{record['dataset']}{mark}" if first else "", record["task"] if first else "", key, shown_value)
            )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if resumed:
        lines.append("* read from the results folder (finished before); delete its JSON file to run it again")
    return "\n".join(lines)
