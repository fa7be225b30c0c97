"""Launch helpers for the multi-process tests: free ports, spawned workers and torchrun, all under timeouts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

# a lost rank must fail a test, never hang it: collectives give up after this, launches are killed after more
COLLECTIVE_TIMEOUT_S = 60
LAUNCH_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker_environment(threads: int = 1) -> dict[str, str]:
    """The environment of a launched process: few threads (two busy cores), short collective timeouts."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "CLIPFORGE_DIST_TIMEOUT": str(COLLECTIVE_TIMEOUT_S),
        "TOKENIZERS_PARALLELISM": "false",
    }


def spawn(worker: Callable, world_size: int, *args, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` spawned processes; raise if one fails."""
    context = mp.start_processes(
        worker, args=(world_size, free_port(), *args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"spawned workers did not finish within {timeout} s")


def launch(arguments: list[str], processes: int, cwd: Path, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """``clipforge <arguments>`` under torchrun with ``processes`` processes on 127.0.0.1 (plain ``python -m
    clipforge`` for one); returns the output, raises with it on failure. A hung launch is killed whole."""
    if processes == 1:
        command = [sys.executable, "-m", "clipforge", *arguments]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "clipforge",
            *arguments,
        ]
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=worker_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # torchrun's workers share its session: one killpg ends them all
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise AssertionError(f"{' '.join(command)} did not finish within {timeout} s:\n{output[-4000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-6000:]}")
    return output
