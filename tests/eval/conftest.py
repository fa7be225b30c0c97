"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest

from tests.eval.benchmark_side import make_benchmark_runnable_here


@pytest.fixture
def clip_benchmark(monkeypatch: pytest.MonkeyPatch):
    """The installed ``clip_benchmark`` package, patched only where it cannot run here (``benchmark_side``)."""
    module = pytest.importorskip("clip_benchmark")
    make_benchmark_runnable_here(monkeypatch)
    return module
