"""What changes as a training run goes: one dataclass, saved in every checkpoint and restored on resume.

The loop's functions take a :class:`RunState` and update it; none of them keeps a value of its own between
steps. The best evaluation metric so far is the one piece of changing state kept elsewhere: the run's
``TrainingEvaluator`` holds it, and its ``state_dict()`` travels in the checkpoint beside this one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint import TrainingState


@dataclass
class LogWindow:
    """What the steps since the last log record add up, kept on the device: no host sync inside a step.

    ``loss_sum`` and ``grad_norm_sum`` are sums over the window's ``steps`` optimizer steps (``grad_norm``: the
    global L2 norm of the gradients before clipping); ``samples`` counts the pairs trained on; ``started`` is the
    window's start on the ``time.perf_counter`` clock, moved forward by the time evaluation takes.
    """

    loss_sum: torch.Tensor
    grad_norm_sum: torch.Tensor
    steps: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, device: torch.device) -> LogWindow:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device))

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, samples: int) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.steps += 1
        self.samples += samples

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps, self.samples = 0, 0
        self.started = time.perf_counter()


@dataclass
class RunState:
    """Everything about a run that changes from step to step.

    ``step``: optimizer steps done. ``samples_seen``: samples consumed over all processes (skipped ones
    included), which is where the sampler resumes. ``data_streams``: the slot layout of a shard stream (see
    :mod:`clipforge.data.streaming`), fixed at the run's start. ``skipped_images``: unreadable images over all
    processes since the run began, resumes included. ``empty_batches``: batches in a row that held nothing to
    contrast (a guard against spinning on unreadable data). ``lr``: the learning rate the last step used.
    ``saved_step``: the step ``last.pt`` holds, so a stop right after a checkpoint does not write it again.
    """

    step: int = 0
    samples_seen: int = 0
    data_streams: int = 1
    skipped_images: int = 0
    empty_batches: int = 0
    lr: float = 0.0
    saved_step: int = 0  # the step last.pt holds (the resumed one, or the last written)
    window: LogWindow = field(default_factory=lambda: LogWindow.on(torch.device("cpu")))
    history: list[dict[str, Any]] = field(default_factory=list)
    last_checkpoint: Path | None = None

    def state_dict(self) -> dict[str, int]:
        """The data position and counts a checkpoint's :class:`~clipforge.checkpoint.TrainingState` keeps for this
        state (the step is the checkpoint's own; the log window starts afresh on resume)."""
        return {
            "samples_seen": self.samples_seen,
            "data_streams": self.data_streams,
            "skipped_images": self.skipped_images,
        }

    def load(self, step: int, training: TrainingState) -> None:
        """Take the step, data position and skipped count of a resumed checkpoint."""
        self.step = self.saved_step = int(step)
        self.samples_seen = int(training.samples_seen)
        self.data_streams = int(training.data_streams or self.data_streams)
        self.skipped_images = int(training.skipped_images or 0)
