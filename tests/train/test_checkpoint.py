import dataclasses
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from clipforge.interop.load import load_checkpoint
from clipforge.train.loop import train
from tests.conftest import tiny_config

FIXTURE = Path(__file__).parent.parent / "fixtures" / "format1-train.pt"


def _small_checkpoint(step: int) -> Checkpoint:
    """A whole checkpoint of a tiny model (the format-1 fixture, read through the upgrade) at ``step``."""
    return dataclasses.replace(read_checkpoint(FIXTURE), step=step)


def test_atomic_save_leaves_no_temporary_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", _small_checkpoint(1))
    assert read_checkpoint(path).step == 1
    broken = _small_checkpoint(2)
    broken.weights = {**broken.weights, "bad": object.__new__(type("Unpicklable", (), {"__reduce__": None}))}
    with pytest.raises(TypeError):
        save_checkpoint(path, broken, replace=True)
    assert read_checkpoint(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_foreign_truncated_and_missing_files_are_refused_clearly(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a clipforge checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "good.pt", _small_checkpoint(3))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pt")


def test_checkpoint_is_self_describing(shapes_manifest: Path, tmp_path: Path) -> None:
    result = train(tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 3}))
    state = read_checkpoint(result.checkpoint)
    training = state.training
    assert state.weights and training.optimizer and training.scheduler and training.rng
    assert state.config.train.steps == 3 and state.processor.tokenizer.vocab_size > 0
    assert state.clipforge_version and training.samples_seen == 3 * state.config.train.batch_size
    loaded = load_checkpoint(result.checkpoint)
    ids, mask = loaded.tokenizer(["a red circle"], loaded.config.model.text.context_length)
    features = loaded.model.encode_text(ids, mask)
    assert features.shape == (1, 32) and torch.allclose(features.norm(dim=-1), torch.ones(1), atol=1e-5)
    assert not loaded.model.training


def test_checkpoint_with_hf_text_tower_loads_without_its_source_folder(shapes_manifest: Path, tmp_path: Path) -> None:
    from tests.conftest import write_tiny_bert

    bert = write_tiny_bert(tmp_path / "tiny-bert")
    text = {"kind": "hf", "name": str(bert), "pretrained": "default", "context_length": 16, "tokenizer": {"kind": "hf"}}
    result = train(tiny_config(shapes_manifest, tmp_path / "run", model={"text": text}, train={"steps": 3}))
    before = load_checkpoint(result.checkpoint)
    ids, mask = before.tokenizer(["a small red circle"], 16)
    expected = before.model.encode_text(ids, mask)
    bert.rename(tmp_path / "moved-away")  # as on another machine, where the folder or hub id is unreachable
    after = load_checkpoint(result.checkpoint)
    assert torch.allclose(after.model.encode_text(*after.tokenizer(["a small red circle"], 16)), expected, atol=1e-6)
