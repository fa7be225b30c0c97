"""Run logs: ``metrics.jsonl`` (one JSON object per log step), a tqdm progress bar, and the backends a run names
in ``logging.backends`` (TensorBoard, Weights & Biases, MLflow: :mod:`clipforge.train.log_backends`).
"""

from __future__ import annotations

import contextlib
import json
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

from clipforge.config import Config, config_to_dict
from clipforge.io import atomic_write_text
from clipforge.train.log_backends import BACKENDS, Backend, RunInfo, import_backends


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order; a line that is not a whole JSON object (the last one,
    when the process was killed while appending it) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The values a backend can plot: ints and floats (bools and anything else stay in ``metrics.jsonl`` only)."""
    return {
        key: value for key, value in metrics.items() if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class RunLogger:
    """Writes metrics of one run; on resume, drops the records after the resumed step first.

    Records after the resume point belong to the interrupted continuation that is being replaced,
    and keeping them would leave two different values for the same step.

    ``backends``: names in :data:`BACKENDS`, each opened once; every package is imported before anything is
    written, so a missing one fails the run at its start. ``run_config``: the resolved config as plain values (the
    W&B config, the MLflow params). ``run_name``: empty = the output folder's name. ``project``: see
    :class:`RunInfo`.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        backends: Sequence[str] = ("tensorboard",),
        progress: bool = True,
        run_config: Mapping[str, Any] | None = None,
        run_name: str = "",
        project: str = "",
    ) -> None:
        output_dir = Path(output_dir)
        modules = import_backends(backends)
        self.metrics_path = output_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= start_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept), replace=True)
        run = RunInfo(output_dir, start_step, dict(run_config or {}), run_name or output_dir.resolve().name, project)
        self._closers = contextlib.ExitStack()  # closes every opened backend, even when one of them fails to close
        self._backends = self._open_backends(modules, run)
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="train", dynamic_ncols=True)
        self._closers.callback(self._bar.close)
        self._shown: dict[str, str] = {}  # the progress line keeps the latest value of every shown key

    @classmethod
    def for_run(cls, config: Config, output_dir: Path, start_step: int = 0) -> RunLogger:
        """The logger of a training run: ``config.logging`` says where, ``config.train.steps`` how far the bar goes,
        and the whole resolved config goes to W&B / MLflow."""
        settings = config.logging
        return cls(
            output_dir,
            config.train.steps,
            start_step,
            backends=settings.backends,
            progress=settings.progress,
            run_config=config_to_dict(config),
            run_name=settings.run_name,
            project=settings.project,
        )

    def _open_backends(self, modules: dict[str, ModuleType], run: RunInfo) -> list[Backend]:
        opened: list[Backend] = []
        try:
            for name, module in modules.items():
                backend = BACKENDS[name].open(module, run)
                self._closers.callback(backend.close)
                opened.append(backend)
        except BaseException:
            self._closers.close()  # a run that cannot start leaves no backend run open
            raise
        return opened

    def log(self, step: int, metrics: dict[str, float], show: tuple[str, ...] = ()) -> None:
        """Record ``metrics`` at ``step``; keys in ``show`` also go on the progress line."""
        record = {"step": step, **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = _numeric(metrics)
        if numeric:
            for backend in self._backends:
                backend.log(step, numeric)
        if show:
            # merged, not replaced: an eval record must not wipe the loss off the line, nor the loss the eval
            self._shown.update({k: _short(metrics[k]) for k in show if k in metrics})
            self._bar.set_postfix(self._shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._closers.close()


def _short(value: float) -> str:
    return f"{value:.4g}"


class NullRunLogger:
    """What ranks other than 0 log: nothing (the interface of :class:`RunLogger`)."""

    def log(self, step: int, metrics: dict[str, float], show: tuple[str, ...] = ()) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
