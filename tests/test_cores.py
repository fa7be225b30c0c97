"""num_workers: auto and the cores a process may use (affinity, cgroup quota, torchrun's local processes)."""

from __future__ import annotations

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
    import os

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
    assert cores.quiet_openmp_waits() is False
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert cores.quiet_openmp_waits() is True
    assert cores.OPENMP_SPIN_COUNT == __import__("os").environ["GOMP_SPINCOUNT"]
