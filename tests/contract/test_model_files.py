"""Damaged and hostile model files: a checkpoint cut or changed anywhere, a config that does not fit its weights,
that lacks its tokenizer, or that asks for absurd sizes, a Hugging Face ``config.json`` with absurd sizes, and two
runs into one folder. Each ends in one clear message (exit code 2) before anything large is allocated."""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.checkpoint import CheckpointError, read_payload
from clipforge.interop.load import load_checkpoint
from tests.contract.conftest import World
from tests.contract.harness import assert_contract, run


def _search(world: World, checkpoint: Path) -> list[str]:
    return ["classify", "--checkpoint", str(checkpoint), "--labels", "red,blue", str(world.photo)]


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(fraction=st.floats(0.0, 0.999), flips=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_a_checkpoint_cut_or_changed_anywhere_is_refused_or_loads(
    fraction: float, flips: int, seed: int, world: World, tmp_path_factory
) -> None:
    data = bytearray(world.checkpoint.read_bytes())
    rng = random.Random(seed)
    if flips:
        for _ in range(flips):
            data[rng.randrange(len(data))] = rng.randrange(256)
    else:
        data = data[: int(len(data) * fraction)]
    damaged = tmp_path_factory.mktemp("damaged") / "last.pt"
    damaged.write_bytes(bytes(data))
    argv = _search(world, damaged)
    outcome = run(argv)
    assert_contract(outcome, argv)
    if not flips:
        assert outcome.code == 2 and "checkpoint" in outcome.err.lower() or "last.pt" in outcome.err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda state: state["processor"].pop("tokenizer"), "tokenizer cannot be rebuilt"),
        (lambda state: state["config"]["model"]["image"].update(width=200_000), "do not fit"),
        (lambda state: state["config"]["model"].update(embed_dim=10**9), "do not fit"),
        (lambda state: state["config"]["model"]["text"].update(depth=7), "do not fit"),
        (lambda state: state["model"].pop(next(iter(state["model"]))), "missing keys"),
        (lambda state: state["config"]["model"]["image"].update(kind="vitt"), "does not fit this clipforge"),
        (lambda state: state.update(config="not a mapping"), "has no config"),
    ],
    ids=["no-tokenizer", "width-2e5", "embed-1e9", "another-depth", "a-weight-missing", "bad-kind", "no-config"],
)
def test_a_checkpoint_whose_parts_do_not_fit_is_refused_before_allocating(
    change, message: str, world: World, tmp_path: Path
) -> None:
    state = read_payload(world.checkpoint)  # the file's own dict, changed where a damaged file would differ
    change(state)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"refusing the checkpoint allocated {grown_mb:.0f} MB"
    outcome = run(_search(world, path))
    assert_contract(outcome, _search(world, path), allowed=(2,))


def test_a_hugging_face_config_with_absurd_sizes_is_refused_before_allocating(tmp_path: Path) -> None:
    from tests.interop.tiny_models import write_hf_clip

    folder = write_hf_clip(tmp_path / "clip")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 10**9
    config["vision_config"]["intermediate_size"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    argv = ["import", f"hf:{folder}", "--out", str(tmp_path / "clip.pt")]
    outcome = run(argv)
    assert_contract(outcome, argv, allowed=(2,))
    assert ("do not fit" in outcome.err or "cannot be built" in outcome.err) and not (tmp_path / "clip.pt").exists()
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 200


def test_two_runs_into_one_folder_the_second_stops_naming_the_first(world: World, tmp_path: Path) -> None:
    output = tmp_path / "run"
    slow = [
        sys.executable,
        "-m",
        "clipforge",
        "train",
        str(world.train_yaml),
        f"train.output_dir={output}",
        "train.steps=400",
        "train.checkpoint_every=400",
    ]
    first = subprocess.Popen(slow, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (output / "config.yaml").exists():
            time.sleep(0.05)  # the first run has the lock and is training
        assert first.poll() is None, "the first run ended before the second could start"
        for extra in ([], ["--resume", "latest"], ["--overwrite"]):
            argv = ["train", str(world.train_yaml), f"train.output_dir={output}", *extra]
            outcome = run(argv)
            assert_contract(outcome, argv, allowed=(2,))
            assert f"pid {first.pid}, clipforge train" in outcome.err, outcome.describe(argv)
    finally:
        first.kill()
        first.wait()
