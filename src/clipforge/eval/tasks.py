"""One evaluation as a value: what to measure (``task``) on which data, and running it on a model.

``clipforge eval`` builds one :class:`EvalTask` from its flags, a suite one per entry (``suite.py``); both run it
with :func:`run_task`, so a suite entry measures exactly what the same flags would. A mistake in a task's inputs
is a ``ConfigError`` naming the field as the user wrote it (``--templates``, or ``datasets[2].templates`` in a
suite: :class:`FieldNames`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from clipforge.config import ConfigError, DataConfig
from clipforge.config.choices import EVAL_TASKS
from clipforge.data.base import ImageTextSource
from clipforge.data.processor import Processor
from clipforge.eval.classification import TieRule
from clipforge.eval.probe import DEFAULT_VAL_PROPORTION, evaluate_linear_probe
from clipforge.eval.results import EvalResult, dataset_label
from clipforge.eval.runner import (
    classification_targets,
    classnames_from_file,
    evaluate_retrieval,
    evaluate_zeroshot,
    open_eval_source,
    source_templates,
)
from clipforge.eval.templates import get_templates
from clipforge.model import CLIPModel

DEFAULT_TEMPLATES = "simple"  # zero-shot prompts when neither the user nor the data gives any


@dataclass
class EvalTask:
    """One evaluation. ``task``: ``zeroshot``, ``retrieval``, ``linear_probe`` or ``fewshot``; ``data``: the test
    data; ``name``: the dataset's name in the results ("" = :func:`~clipforge.eval.results.dataset_label`).

    Zero-shot: ``templates`` (any ``get_templates`` spec; None = the data's own templates, else ``simple``) and
    ``classnames`` (a file, or ``file.json:dataset``; None = the data's own). Probes: ``train_data`` (None = the
    test data with ``split: train``, for kinds with splits), ``val_data`` (None = a random ``val_proportion`` of the
    training images), ``shots`` (``fewshot``: K images per class) and ``seed``.
    """

    task: str
    data: DataConfig
    name: str = ""
    templates: str | Sequence[str] | None = None
    classnames: str | None = None
    train_data: DataConfig | None = None
    val_data: DataConfig | None = None
    val_proportion: float = DEFAULT_VAL_PROPORTION
    shots: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class FieldNames:
    """How the user wrote each of an :class:`EvalTask`'s fields, for messages: flags by default."""

    task: str = "--task"
    data: str = "--data"
    templates: str = "--templates"
    classnames: str = "--classnames"
    train_data: str = "--train-data"
    val_data: str = "--val-data"
    val_proportion: str = "--val-proportion"
    shots: str = "--shots"


@dataclass
class TaskRun:
    """What :func:`run_task` measured, the dataset's name in the results, and the test source it read."""

    result: EvalResult
    dataset: str
    source: ImageTextSource


def check_task(task: EvalTask, names: FieldNames = FieldNames()) -> None:
    """The task's own rules, before any file is opened: a known task, ``shots`` exactly for ``fewshot``, a
    validation proportion in (0, 1), zero-shot fields only on zero-shot tasks."""
    if task.task not in EVAL_TASKS:
        raise ConfigError(f"{names.task}={task.task!r}: expected one of {list(EVAL_TASKS)}")
    if task.task == "fewshot" and (task.shots is None or task.shots < 1):
        raise ConfigError(f"{names.task}=fewshot needs {names.shots} K: the training images per class (K >= 1)")
    if task.task != "fewshot" and task.shots is not None:
        raise ConfigError(f"{names.shots} applies to the fewshot task only; remove it or use task fewshot")
    probe = task.task in ("linear_probe", "fewshot")
    if not probe:
        given = [name for name in ("train_data", "val_data") if getattr(task, name) is not None]
        if given:
            raise ConfigError(f"{getattr(names, given[0])} is the training data of a probe; {task.task} uses none")
    elif not 0 < task.val_proportion < 1:
        raise ConfigError(f"{names.val_proportion}={task.val_proportion} must lie in (0, 1)")
    if task.task != "zeroshot" and (task.templates is not None or task.classnames is not None):
        field = names.templates if task.templates is not None else names.classnames
        raise ConfigError(f"{field} sets zero-shot prompts; task {task.task} uses none, so remove it")


def default_train_data(data: DataConfig, names: FieldNames = FieldNames()) -> DataConfig:
    """The test data's ``split: train`` counterpart, for a probe given no training data (CLIP_benchmark's
    ``--train_split train``); a kind without splits must be given its training data."""
    if "split" not in type(data).own_fields():
        raise ConfigError(
            f"a probe trains on labelled images: give {names.train_data} (data.kind={data.kind!r} has no split to "
            "switch to train)"
        )
    return dataclasses.replace(data, split="train")


def _open(data: DataConfig, field: str, labelled: bool = False) -> ImageTextSource:
    """The source ``data`` names (``field``: where the user wrote it); ``labelled``: it must have class labels."""
    try:
        source = open_eval_source(data)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{field}: {error}") from error
    if labelled and source.labels is None:
        raise ConfigError(
            f"{field}: a linear probe trains and tests on class labels, and data.kind={data.kind!r} here has none; "
            "use a labelled source (a manifest with a label column, imagefolder, idx, cifar, torchvision, shards "
            "with .cls)"
        )
    return source


def _zeroshot_inputs(
    task: EvalTask, source: ImageTextSource, dataset: str, names: FieldNames
) -> tuple[list[str] | None, list[str]]:
    """(class names or None = the source's own, prompt templates); each mistake names its field."""
    spec = task.templates if task.templates is not None else source_templates(source) or DEFAULT_TEMPLATES
    try:
        templates = get_templates(spec)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{names.templates}: {error}") from error
    try:
        classnames = classnames_from_file(source, task.classnames, task.data.kind) if task.classnames else None
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{names.classnames}: {error}") from error
    try:
        classification_targets(source, classnames)
    except ValueError as error:
        raise ConfigError(f"{names.task} zeroshot on {dataset}: {error}") from error
    return classnames, templates


def run_task(
    model: CLIPModel,
    processor: Processor,
    task: EvalTask,
    batch_size: int = 256,
    autocast: contextlib.AbstractContextManager | None = None,
    num_workers: int | None = None,
    ties: TieRule = "pessimistic",
    names: FieldNames = FieldNames(),
) -> TaskRun:
    """Run ``task`` on ``model`` (in eval mode) with its ``processor``. ``num_workers``: loader processes (None:
    the data section's ``num_workers``)."""
    check_task(task, names)
    probe = task.task in ("linear_probe", "fewshot")
    source = _open(task.data, names.data, labelled=probe)
    dataset = task.name or dataset_label(task.data)
    workers = task.data.num_workers if num_workers is None else num_workers
    common = {"batch_size": batch_size, "autocast": autocast, "num_workers": workers, "ties": ties}
    try:
        if task.task == "zeroshot":
            classnames, templates = _zeroshot_inputs(task, source, dataset, names)
            result = evaluate_zeroshot(model, processor, source, classnames, templates, **common)
        elif task.task == "retrieval":
            result = evaluate_retrieval(model, processor, source, **common)
        else:
            train_data = task.train_data or default_train_data(task.data, names)
            train = _open(train_data, names.train_data, labelled=True)
            validation = _open(task.val_data, names.val_data, labelled=True) if task.val_data is not None else None
            result = evaluate_linear_probe(
                model,
                processor,
                train,
                source,
                validation,
                shots=task.shots,
                val_proportion=task.val_proportion,
                seed=task.seed,
                **common,
            )
    except ConfigError:
        raise
    except ValueError as error:  # the data cannot be evaluated (no readable image, too few shots): say so
        raise ConfigError(f"{task.task} on {dataset}: {error}") from error
    return TaskRun(result, dataset, source)
