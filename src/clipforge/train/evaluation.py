"""Evaluation during training: the run's ``eval:`` tasks, every ``eval.every`` steps and after the last step.

A round embeds with the current weights in eval mode, with the evaluation transform and the run's autocast,
and returns ``{task name}/{metric}`` values for the run's logger, and whether ``eval.best_metric`` improved
(the trainer then writes ``best.pt``). A round leaves no trace on training: the model goes back to train mode,
and every random generator the run draws from is restored (starting a DataLoader iterator draws a seed from
torch's global RNG), so a run with evaluation reaches the same weights as one without, and resume stays exact.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipforge.config import Config, ConfigError, EvalTaskConfig
from clipforge.cores import resolve_workers
from clipforge.data.base import ImageTextSource
from clipforge.data.processor import Processor
from clipforge.eval.features import LockedTowerMemo
from clipforge.eval.runner import (
    classification_targets,
    classnames_from_file,
    evaluate_retrieval,
    evaluate_zeroshot,
    open_eval_source,
    zeroshot_classifier,
)
from clipforge.eval.templates import get_templates
from clipforge.model import CLIPModel

logger = logging.getLogger("clipforge")


class ClassifierCache:
    """Zero-shot classifiers keyed by ``(step, class names, templates)``, holding one step at a time.

    Within one evaluation round, tasks that prompt the same classes with the same templates (say, the val and
    test split of one dataset) share a classifier: the C x T prompts go through the text tower once. Entries
    cannot outlive their step: every optimizer step changes the text tower, so a classifier built at step k
    describes weights that no longer exist at step k + 1. Asking for a new step drops the old entries.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._classifiers: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}
        self.builds = 0  # how many classifiers were actually encoded (tests read it)

    def get(
        self, step: int, classnames: Sequence[str], templates: Sequence[str], build: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """The classifier for this key, calling ``build()`` only when this step has not built it yet."""
        if step != self._step:
            self._step, self._classifiers = step, {}
        key = (tuple(classnames), tuple(templates))
        if key not in self._classifiers:
            self._classifiers[key] = build()
            self.builds += 1
        return self._classifiers[key]


@dataclass
class _Task:
    """An evaluation task made ready at the start of the run: its source opened, templates and names read."""

    config: EvalTaskConfig
    source: ImageTextSource
    templates: list[str]
    classnames: list[str] | None


@contextlib.contextmanager
def _untouched_rng(device: torch.device) -> Iterator[None]:
    """Run the body, then put back the Python, NumPy and torch (CPU and this CUDA device) random states."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


class TrainingEvaluator:
    """The ``eval:`` section of a run: tasks opened once, run on demand, and the best value so far.

    Sources, templates and class names are opened and checked here, at the start of the run, so a wrong path
    or a zero-shot task on an unlabelled source fails before the first step, not hours into the run.
    """

    def __init__(self, config: Config, processor: Processor, autocast: contextlib.AbstractContextManager) -> None:
        self.eval_config = config.eval
        self.total_steps = config.train.steps
        self.processor = processor
        self.autocast = autocast
        with _untouched_rng(torch.device("cpu")):  # opening a source must not shift the run's random stream
            self.tasks = [self._prepare(task, position) for position, task in enumerate(config.eval.tasks)]
        self.cache = ClassifierCache()
        # locked towers (LiT) give the same outputs every round: only the heads run again after the first
        self.memo = LockedTowerMemo()
        self.best_value: float | None = None
        self.best_step: int | None = None
        self._check_best_metric()

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare(self, task: EvalTaskConfig, position: int) -> _Task:
        where = f"eval.tasks[{position}] ({task.name})"
        try:
            source = open_eval_source(task.data)
            if task.task == "retrieval":
                return _Task(task, source, [], None)
            templates = get_templates(task.templates)
            names = classnames_from_file(source, task.classnames, task.data.kind) if task.classnames else None
            _, names = classification_targets(source, names)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"{where}: {error}") from error
        return _Task(task, source, templates, names)

    def _check_best_metric(self) -> None:
        # config validation knows the metric names; only here are the class counts known (acc5 needs 5 classes)
        name, _, metric = self.eval_config.best_metric.partition("/")
        for task in self.tasks:
            if task.config.name == name and metric == "acc5" and len(task.classnames) < 5:
                raise ConfigError(
                    f"eval.best_metric={self.eval_config.best_metric!r}: task {name!r} has "
                    f"{len(task.classnames)} classes, and top-5 accuracy needs at least 5; choose acc1"
                )

    # -- running -----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step``: every ``eval.every`` steps, and after the last."""
        every = self.eval_config.every
        return bool(self.tasks) and ((every > 0 and step % every == 0) or step == self.total_steps)

    @property
    def shown(self) -> tuple[str, ...]:
        """The keys for the progress line: the best metric, else each task's headline figure."""
        if self.eval_config.best_metric:
            return (self.eval_config.best_metric,)
        return tuple(
            f"{task.config.name}/{'acc1' if task.config.task == 'zeroshot' else 'image_retrieval_recall@1'}"
            for task in self.tasks
        )

    def run(self, model: CLIPModel, step: int) -> tuple[dict[str, float], bool]:
        """Evaluate every task with the model as it is after ``step``.

        Returns the ``{task name}/{metric}`` record and whether ``eval.best_metric`` reached a new best
        (strictly better than every earlier round; the first round always is).
        """
        device = next(model.parameters()).device
        was_training = model.training
        record: dict[str, float] = {}
        model.eval()
        try:
            with _untouched_rng(device):
                for task in self.tasks:
                    for key, value in self._evaluate(model, task, step).items():
                        record[f"{task.config.name}/{key}"] = value
        finally:
            model.train(was_training)
        logger.info("eval at step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
        return record, self._update_best(record, step)

    def _evaluate(self, model: CLIPModel, task: _Task, step: int) -> dict[str, float]:
        batch_size = self.eval_config.batch_size
        workers = resolve_workers(task.config.data.num_workers)
        if task.config.task == "retrieval":
            result = evaluate_retrieval(
                model, self.processor, task.source, batch_size, self.autocast, workers, memo=self.memo
            )
        else:

            def build() -> torch.Tensor:
                return zeroshot_classifier(
                    model, self.processor, task.classnames, task.templates, batch_size, self.autocast, self.memo
                )

            classifier = self.cache.get(step, task.classnames, task.templates, build)
            result = evaluate_zeroshot(
                model,
                self.processor,
                task.source,
                task.classnames,
                task.templates,
                batch_size,
                self.autocast,
                workers,
                classifier,
                self.memo,
            )
        if result.skipped_images:
            logger.warning(
                "eval %s: skipped %d unreadable images (first: %s)",
                task.config.name,
                result.skipped_images,
                result.skipped[0].where,
            )
        return result.metrics

    def _update_best(self, record: dict[str, float], step: int) -> bool:
        key = self.eval_config.best_metric
        if not key:
            return False
        value = record[key]
        if math.isnan(value):
            return False
        if self.best_value is not None:
            better = value > self.best_value if self.eval_config.best_mode == "max" else value < self.best_value
            if not better:
                return False
        self.best_value, self.best_step = value, step
        return True

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The best value so far, saved in every checkpoint so a resumed run keeps comparing against it."""
        return {"best_metric": self.eval_config.best_metric, "best_value": self.best_value, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a best value measured by another metric means nothing for this one: start afresh
        if state and state.get("best_metric") == self.eval_config.best_metric:
            self.best_value, self.best_step = state.get("best_value"), state.get("best_step")
