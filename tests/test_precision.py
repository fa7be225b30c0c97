"""precision: auto - bf16 only where the device runs it natively and faster, fp32 otherwise, with the reason."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipforge.config import load_config
from clipforge.runtime import autocast_context, probes, resolve_precision
from clipforge.runtime import precision as module

CPU = torch.device("cpu")
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


@pytest.fixture(autouse=True)
def fresh_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test decides afresh (no in-process memo) with its own probe cache file."""
    monkeypatch.setenv("CLIPFORGE_CACHE_DIR", str(tmp_path / "cache"))
    module._resolve.cache_clear()
    probes.measured_once.cache_clear()
    yield
    module._resolve.cache_clear()
    probes.measured_once.cache_clear()


def _cpu(monkeypatch: pytest.MonkeyPatch, flags: set[str], speedup: float | None) -> list[int]:
    """A CPU with ``flags`` whose probe measures ``speedup`` (None: the probe must not run); returns a call log."""
    calls: list[int] = []

    def probe() -> float:
        if speedup is None:
            raise AssertionError("the probe ran on a CPU without bf16 units")
        calls.append(1)
        return speedup

    monkeypatch.setattr(module, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(module, "measure_cpu_bf16_speedup", probe)
    return calls


def test_auto_is_fp32_without_bf16_units_and_never_probes(monkeypatch, caplog) -> None:
    _cpu(monkeypatch, {"avx2", "fma"}, speedup=None)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        choice = resolve_precision("auto", CPU)
    assert choice.precision == "fp32" and "no bf16 units" in choice.reason
    assert sum("precision auto -> fp32" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.parametrize(("speedup", "expected"), [(2.1, "bf16"), (1.1, "fp32"), (0.4, "fp32")])
def test_auto_with_bf16_units_follows_the_probe(monkeypatch, speedup: float, expected: str) -> None:
    _cpu(monkeypatch, {"avx512f", "avx512_bf16", "amx_bf16"}, speedup)
    choice = resolve_precision("auto", CPU)
    assert choice.precision == expected and f"{speedup:.1f}" in choice.reason


def test_an_explicit_bf16_is_kept_and_warns_with_the_measured_slowdown(monkeypatch, caplog) -> None:
    _cpu(monkeypatch, {"avx2"}, speedup=1 / 7.4)
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert resolve_precision("bf16", CPU).precision == "bf16"
        resolve_precision("bf16", CPU)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "7.4x slower than fp32" in warnings[0] and "auto" in warnings[0]


def test_fp16_computes_in_fp32_on_the_cpu_and_fp32_is_never_probed(monkeypatch) -> None:
    _cpu(monkeypatch, {"amx_bf16"}, speedup=None)
    assert resolve_precision("fp16", CPU).precision == "fp32"
    assert resolve_precision("fp32", CPU).precision == "fp32"


def test_the_probe_runs_once_per_cpu_kind_and_isa_setting(monkeypatch) -> None:
    calls = _cpu(monkeypatch, {"amx_bf16"}, speedup=2.0)
    module.cpu_bf16_speedup()
    probes.measured_once.cache_clear()  # a new process: the figure comes from the file
    assert module.cpu_bf16_speedup() == 2.0 and len(calls) == 1
    cached = json.loads((Path(os.environ["CLIPFORGE_CACHE_DIR"]) / "machine-probes.json").read_text())
    assert [entry["bf16_speedup"] for entry in cached.values()] == [2.0]
    probes.measured_once.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # other kernels: measured again
    module.cpu_bf16_speedup()
    assert len(calls) == 2


def test_an_unwritable_or_damaged_cache_only_costs_a_measurement(monkeypatch, tmp_path: Path) -> None:
    calls = _cpu(monkeypatch, {"amx_bf16"}, speedup=1.5)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "machine-probes.json").write_text("{not json")
    assert module.cpu_bf16_speedup() == 1.5 and len(calls) == 1
    monkeypatch.setenv("CLIPFORGE_CACHE_DIR", "/proc/no-such-folder")  # cannot be created
    probes.measured_once.cache_clear()
    assert module.cpu_bf16_speedup() == 1.5 and len(calls) == 2


def test_the_real_probe_measures_a_finite_positive_ratio() -> None:
    speedup = module.measure_cpu_bf16_speedup(tokens=16, width=64, rounds=1)
    assert math.isfinite(speedup) and speedup > 0


def test_auto_computes_in_fp32_when_it_decides_fp32(monkeypatch) -> None:
    _cpu(monkeypatch, {"avx2"}, speedup=None)
    layer = torch.nn.Linear(8, 8)
    with autocast_context(CPU, "auto"):
        out = layer(torch.randn(2, 8))
    assert out.dtype == torch.float32


def test_recipes_for_real_training_use_auto_and_the_demo_stays_fp32() -> None:
    assert load_config("finetune-clip").train.precision == "auto"
    assert load_config("finetune-clip").data.num_workers == "auto"
    assert load_config("demo-lit").train.precision == "fp32"  # its README figures are the same on every CPU


def test_auto_picks_fp32_when_the_cpu_kernels_are_avx2_only() -> None:
    """The issue's case, with the real probe: AVX2 dispatch forced (what an AVX2-only CPU runs)."""
    probe = (
        "import torch\n"
        "from clipforge.runtime import resolve_precision\n"
        "print(resolve_precision('auto', torch.device('cpu')).precision)\n"
    )
    env = {**os.environ, **AVX2_ONLY}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "fp32", result.stderr
