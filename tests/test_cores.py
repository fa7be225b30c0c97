"""num_workers: auto and the cores a process may use (affinity, cgroup quota, torchrun's local processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipforge import cores
from clipforge.config import ConfigError, data_config_from_dict
from clipforge.runtime import usable_workers, workers


@pytest.mark.parametrize(
    ("available", "local", "expected"), [(1, "1", 0), (2, "1", 1), (16, "1", 8), (64, "1", 8), (16, "4", 2)]
)
def test_auto_workers_take_half_of_this_process_share(monkeypatch, available: int, local: str, expected: int) -> None:
    monkeypatch.setattr(cores, "available_cores", lambda: available)
    monkeypatch.setattr(workers, "available_cores", lambda: available)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert cores.auto_workers() == expected
    assert usable_workers("auto") == expected


def test_a_cgroup_quota_limits_the_cores(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cores._cgroup_cpu_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert cores._cgroup_cpu_quota(quota) is None


@given(st.text(max_size=40))
def test_any_cgroup_file_content_reads_as_a_quota_or_none(content: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cpu.max"
        path.write_text(content)
        quota = cores._cgroup_cpu_quota(path)
    assert quota is None or isinstance(quota, float)


def test_available_cores_is_at_least_one_and_at_most_the_machine() -> None:
    assert 1 <= cores.available_cores() <= (os.cpu_count() or 1)


def test_the_data_section_takes_auto_and_names_the_choices_otherwise() -> None:
    assert data_config_from_dict({"kind": "emoji", "num_workers": "auto"}).num_workers == "auto"
    with pytest.raises(ConfigError, match="auto"):
        data_config_from_dict({"kind": "emoji", "num_workers": "many"})


def test_openmp_waits_are_left_alone_when_the_user_chose(monkeypatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    # an earlier in-process CLI call (or the CI's environment) may have set these; the test owns them here
    for name in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    assert cores.quiet_openmp_waits(load=2.0) is False and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert cores.quiet_openmp_waits(load=0.0) is True
    assert cores.OPENMP_SPIN_COUNT == os.environ["GOMP_SPINCOUNT"] and "OMP_WAIT_POLICY" not in os.environ


@pytest.mark.parametrize("load", [0.5, 1.0, 7.5])
def test_openmp_threads_sleep_at_once_when_other_processes_use_the_cores(monkeypatch, load: float) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        monkeypatch.delenv(name, raising=False)
    assert cores.quiet_openmp_waits(load=load) is True
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


def test_the_load_of_another_busy_process_is_seen() -> None:
    """A process spinning on one core shows as (at least) about one core of other load."""
    if cores.other_load(0.05) is None:
        pytest.skip("no /proc/stat, or a CPU quota: the load cannot be attributed to this process's cores")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        seen = cores.other_load(0.5)
    finally:
        busy.kill()
        busy.wait()
    assert seen is not None and 0.5 <= seen <= len(os.sched_getaffinity(0)) + 0.2
