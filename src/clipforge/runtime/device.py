"""The device a command computes on, the global random generators, and signals in loader workers."""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch

from clipforge.config import ConfigError
from clipforge.config.validation import check_device_name


def resolve_device(name: str, field: str = "train.device") -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as named
    (ConfigError naming ``field`` for anything else, or for a CUDA device this machine lacks)."""
    check_device_name(name, field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}={name!r} but CUDA is not available here; use {field}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{field}={name!r} but this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def ignore_interrupt_signals(_worker_id: int = 0) -> None:
    """A loader worker's ``worker_init_fn``: ignore SIGINT and SIGTERM.

    Ctrl-C signals the terminal's whole process group, and a job scheduler's SIGTERM often does too; the main
    process then finishes its step, saves and stops, which needs its workers alive until it shuts them down
    (they exit with it: PyTorch's workers watch their parent).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' state (Python, torch CPU, and CUDA on a CUDA device), for a checkpoint."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
