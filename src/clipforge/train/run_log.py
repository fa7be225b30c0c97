"""Run logs: ``metrics.jsonl`` (one JSON object per log step), what a person or a log file is shown, and the
backends a run names in ``logging.backends`` (TensorBoard, Weights & Biases, MLflow:
:mod:`clipforge.train.log_backends`).

What is shown depends on who reads it (:func:`interactive`): on a terminal, a tqdm progress line (the latest loss,
learning rate, samples/s and evaluation figure on it, log lines printed above it); anywhere else (a file, a pipe, a
scheduler's log) plain log lines, never tqdm's ``\r`` frames: one line per ``logging.log_every`` steps (step, loss,
lr, samples/s ...) and each evaluation on its own line. ``logging.progress: false`` turns the bar off, never the
lines. A run starts with a summary (:func:`start_summary`): its data, parameters, device, precision and loader.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clipforge.config import Config, config_to_dict
from clipforge.io import atomic_write_text
from clipforge.train.log_backends import BACKENDS, Backend, RunInfo, import_backends

logger = logging.getLogger("clipforge")


def interactive() -> bool:
    """Whether a person watches this process's output: stdout and stderr are both terminals (tqdm draws on stderr,
    where the log lines go too; a run piped to ``tee`` or redirected to a file gets plain lines)."""
    return _is_terminal(sys.stdout) and _is_terminal(sys.stderr)


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class LineProgress:
    """Progress for a log file: ``desc: done of total (p%), rate unit/s`` as one plain log line at most every
    ``every_s`` seconds and once at the end. The part of tqdm's interface the callers use (``update``, ``close``)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, every_s: float = 30.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.logged = initial
        self.started = self.last = time.perf_counter()
        self.start = initial

    def update(self, count: int = 1) -> None:
        self.done += count
        if time.perf_counter() - self.last >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.done != self.logged:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        rate = (self.done - self.start) / max(now - self.started, 1e-9)
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        logger.info("%s: %d of %d%s, %.1f %s/s", self.desc, self.done, self.total, share, rate, self.unit)
        self.last, self.logged = now, self.done

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm | LineProgress:
    """A tqdm bar on a terminal (:func:`interactive`), plain :class:`LineProgress` lines otherwise; a disabled
    one shows nothing."""
    if enabled and not interactive():
        return LineProgress(total, desc, unit, initial)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=False)


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
        self.total_steps = total_steps
        self.bar_shown = progress and interactive()  # else a plain line per training record (module docstring)
        self._bar = tqdm(
            total=total_steps, initial=start_step, disable=not self.bar_shown, desc="train", dynamic_ncols=True
        )
        self._closers.callback(self._bar.close)
        if self.bar_shown:  # log lines go above the bar instead of through it
            self._closers.enter_context(logging_redirect_tqdm())
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
        """Record ``metrics`` at ``step``; keys in ``show`` also go on the progress bar, or, without one, on the
        plain line a training record (one with a ``loss``) gets: ``step 50/300  loss 2.31  lr 0.001 ...``.
        Evaluation records have their own line (``clipforge.train.evaluation`` logs it)."""
        record = {"step": step, **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = _numeric(metrics)
        if numeric:
            for backend in self._backends:
                backend.log(step, numeric)
        if self.bar_shown and show:
            # merged, not replaced: an eval record must not wipe the loss off the line, nor the loss the eval
            self._shown.update({k: _short(metrics[k]) for k in show if k in metrics})
            self._bar.set_postfix(self._shown, refresh=False)
        elif not self.bar_shown and "loss" in metrics:
            figures = "".join(f"  {key} {_short(metrics[key])}" for key in show if key in metrics)
            logger.info("step %d/%d%s", step, self.total_steps, figures)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._closers.close()


def _short(value: float) -> str:
    return f"{value:.4g}"


def start_summary(
    *,
    steps: int,
    batch_size: int,
    pairs: int | None,
    data_kind: str,
    parameters: int,
    trainable: int,
    device: Any,
    processes: int,
    precision: str,
    reason: str,
    workers: int,
) -> list[str]:
    """The lines a run starts with: what it trains on, what it trains, where and how.

    ``pairs``: the image-text pairs an epoch visits (None: streamed, no length known); ``precision``/``reason``:
    what the towers compute in and why (:func:`clipforge.runtime.resolve_precision`)."""
    data = f"{pairs:,} image-text pairs" if pairs is not None else "pairs streamed from shards"
    where = f"{device}" + (f" x {processes} processes" if processes > 1 else "")
    return [
        f"training {steps:,} steps of {batch_size:,} pairs on {data} ({data_kind}), "
        f"{workers} loader worker{'s' if workers != 1 else ''}{' per process' if processes > 1 else ''}",
        f"parameters: {trainable:,} trainable of {parameters:,}; device {where}; precision {precision} ({reason})",
    ]


class NullRunLogger:
    """What ranks other than 0 log: nothing (the interface of :class:`RunLogger`)."""

    def log(self, step: int, metrics: dict[str, float], show: tuple[str, ...] = ()) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
