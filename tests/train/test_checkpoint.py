from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from clipforge.train.loop import train
from tests.conftest import tiny_config


def test_atomic_save_leaves_no_temporary_and_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {"step": 1, "config": {}})
    assert read_checkpoint(path)["step"] == 1
    with pytest.raises(TypeError):
        save_checkpoint(
            path, {"step": 2, "bad": object.__new__(type("Unpicklable", (), {"__reduce__": None}))}, replace=True
        )
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_foreign_truncated_and_missing_files_are_refused_clearly(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a clipforge checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "good.pt", {"step": 3})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "none.pt")


def test_checkpoint_is_self_describing(shapes_manifest: Path, tmp_path: Path) -> None:
    result = train(tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 3}))
    state = read_checkpoint(result.checkpoint)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "config",
        "tokenizer",
        "rng",
        "clipforge_version",
        "samples_seen",
    } <= set(state)
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
