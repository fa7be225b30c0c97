"""The WiSE-FT curve: the models on the path from a model to its fine-tune (``clipforge.interop.merge``), each
evaluated on the same tasks, so the gain on the target can be read against the skill kept elsewhere.

The tasks are an ``eval:`` section (:class:`~clipforge.config.EvalConfig`, the one a training run evaluates during
training: sources opened once, zero-shot classifiers built once per model) run by the training evaluator
(:class:`~clipforge.train.evaluation.TrainingEvaluator`). A tower that is locked in the merged model and has the same
weights at both ends is the same at every alpha, so its features are computed once for the whole sweep (the
evaluator's memo); any other tower runs for each point.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clipforge.config import Config, ConfigError, EvalConfig
from clipforge.eval.features import LockedTowerMemo
from clipforge.interop.load import build
from clipforge.interop.merge import check_compatible, interpolate
from clipforge.interop.resolved import Resolved
from clipforge.runtime import inference_autocast
from clipforge.train.evaluation import TrainingEvaluator

logger = logging.getLogger("clipforge")

HEADLINE = {"zeroshot": "acc1", "retrieval": "image_retrieval_recall@5"}  # a task's metric when none is named


@dataclass
class SweepPoint:
    """The model at ``alpha`` and what it measured: ``{task name}/{metric}`` -> value."""

    alpha: float
    metrics: dict[str, float] = field(default_factory=dict)

    def value(self, key: str) -> float:
        return self.metrics[key]

    def retained(self, keys: Sequence[str]) -> float:
        """The mean of the ``keys`` metrics (the retained skill, one number)."""
        return sum(self.metrics[key] for key in keys) / len(keys)


def headline_metrics(evaluation: EvalConfig) -> list[str]:
    """``{task}/{metric}`` of each task's headline figure: top-1 accuracy, or text -> image recall@5."""
    return [f"{task.name}/{HEADLINE[task.task]}" for task in evaluation.tasks]


def check_metric_names(evaluation: EvalConfig, names: Sequence[str], flag: str) -> None:
    """ConfigError naming ``flag`` when a ``{task}/{metric}`` in ``names`` is not one the tasks report."""
    from clipforge.config import EVAL_METRICS

    tasks = {task.name: task.task for task in evaluation.tasks}
    for name in names:
        task, _, metric = name.partition("/")
        if task not in tasks or metric not in EVAL_METRICS[tasks[task]]:
            known = [f"{t}/{m}" for t, kind in tasks.items() for m in EVAL_METRICS[kind][:2]]
            raise ConfigError(f"{flag} {name!r} is not a metric the eval tasks report; e.g. {known}")


def _same_tower(first: Resolved, second: Resolved, prefix: str) -> bool:
    keys = [key for key in second.weights if key.startswith(prefix)]
    return all(torch.equal(first.weights[key], second.weights[key]) for key in keys)


def sweep(
    first: Resolved,
    second: Resolved,
    alphas: Sequence[float],
    evaluation: EvalConfig,
    device: torch.device,
) -> list[SweepPoint]:
    """Evaluate the model at each of ``alphas`` between ``first`` (0) and ``second`` (1) on ``evaluation``'s tasks
    (module docstring); the points in the order of ``alphas``."""
    check_compatible(first, second)
    if not evaluation.tasks:
        raise ConfigError("the sweep needs eval tasks: --eval FILE with an eval: section (or a --to run that has one)")
    config = Config(eval=EvalConfig(tasks=evaluation.tasks, batch_size=evaluation.batch_size))
    autocast = inference_autocast(device, second.config.train.precision)
    evaluator = TrainingEvaluator(config, second.processor, autocast)
    same = {prefix: _same_tower(first, second, prefix) for prefix in ("image_tower.", "text_tower.")}
    points = []
    for position, alpha in enumerate(alphas):
        model = build(interpolate(first, second, alpha), device).model
        # the memo keeps locked towers' features: right only while each locked tower is the same at every alpha
        locked = [
            prefix
            for prefix, is_locked in (("image_tower.", model.image_locked), ("text_tower.", model.text_locked))
            if is_locked
        ]
        if not all(same[prefix] for prefix in locked):
            evaluator.memo = LockedTowerMemo()
        record, _ = evaluator.run(model, step=position)
        points.append(SweepPoint(alpha, record))
        logger.info("alpha=%g: %s", alpha, ", ".join(f"{k}={v:.4g}" for k, v in record.items()))
    return points


def format_curve(points: Sequence[SweepPoint], target: str, retained: Sequence[str]) -> str:
    """The curve as a table: alpha, the target metric, each retained metric and their mean."""
    columns = [target, *retained]
    header = f"{'alpha':>6}  " + "  ".join(f"{name:>{max(12, len(name))}}" for name in columns)
    if len(retained) > 1:
        header += f"  {'retained (mean)':>15}"
    lines = [header]
    for point in points:
        row = f"{point.alpha:6.2f}  " + "  ".join(f"{point.value(name):>{max(12, len(name))}.4f}" for name in columns)
        if len(retained) > 1:
            row += f"  {point.retained(retained):15.4f}"
        lines.append(row)
    return "\n".join(lines)
