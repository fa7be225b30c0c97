"""Run logs: ``metrics.jsonl`` (one JSON object per log step), TensorBoard, and a tqdm progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("clipforge")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file, in order."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Writes metrics of one run; on resume, drops the records after the resumed step first.

    Records after the resume point belong to the interrupted continuation that is being replaced,
    and keeping them would leave two different values for the same step.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.metrics_path = output_dir / "metrics.jsonl"
        kept = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= start_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                logger.warning("tensorboard is not installed; logging to metrics.jsonl only (pip install tensorboard)")
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="train", dynamic_ncols=True)
        self._shown: dict[str, str] = {}  # the progress line keeps the latest value of every shown key

    def log(self, step: int, metrics: dict[str, float], show: tuple[str, ...] = ()) -> None:
        """Record ``metrics`` at ``step``; keys in ``show`` also go on the progress line."""
        record = {"step": step, **metrics}
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
        if show:
            # merged, not replaced: an eval record must not wipe the loss off the line, nor the loss the eval
            self._shown.update({k: _short(metrics[k]) for k in show if k in metrics})
            self._bar.set_postfix(self._shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def close(self) -> None:
        self._bar.close()
        if self._writer is not None:
            self._writer.close()


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
