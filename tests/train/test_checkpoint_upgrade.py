"""Checkpoints written by an older clipforge still load, through the format upgrades, to the same model.

The fixtures (``tests/fixtures/``) were written by clipforge at checkpoint format 1, with the embeddings that
version computed for fixed inputs; a later version must read them and give the same processor outputs and the
same embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.checkpoint import FORMAT_VERSION, read_checkpoint, read_payload, save_checkpoint
from clipforge.interop.load import load_checkpoint

FIXTURES = Path(__file__).parent.parent / "fixtures"
NAMES = ["format1-train", "format1-imported-siglip", "format1-hf-text"]


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "format1-expected.pt", weights_only=True)


def fixed_image() -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, 40 * 28 * 3).reshape(28, 40, 3).astype(np.uint8), "RGB")


@pytest.mark.parametrize("name", NAMES)
def test_a_format_1_checkpoint_loads_to_the_same_model(name: str, expected: dict) -> None:
    assert torch.load(FIXTURES / f"{name}.pt", weights_only=True).get("format_version") == 1
    old = expected[name]
    loaded = load_checkpoint(FIXTURES / f"{name}.pt")
    processor = loaded.processor
    tokens = processor.text(["a small red circle", "blue"])
    assert torch.equal(tokens["input_ids"], old["ids"]) and torch.equal(tokens["attention_mask"], old["mask"])
    assert torch.equal(processor.images(fixed_image()), old["pixels"])
    # The processor outputs are compared bit for bit; the embeddings within float32 rounding, because the CPU's
    # matmul kernel (oneDNN or MKL, chosen per machine, and its ISA) may sum in another order than the machine
    # that wrote the fixtures (1 ulp seen on another Xeon).
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(old["pixels"]), old["image"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.model.encode_text(old["ids"], old["mask"]), old["text"], rtol=1e-5, atol=1e-6)


def test_an_upgraded_checkpoint_saves_at_the_current_format_and_reads_back_equal(tmp_path: Path) -> None:
    old = read_checkpoint(FIXTURES / "format1-train.pt")
    assert old.training is not None and old.training.samples_seen == 8 and old.step == 2
    path = save_checkpoint(tmp_path / "again.pt", old)
    assert read_payload(path)["format_version"] == FORMAT_VERSION
    again = read_checkpoint(path)
    assert again.config == old.config and again.step == old.step
    assert again.processor.state_dict() == old.processor.state_dict()
    assert all(torch.equal(again.weights[key], value) for key, value in old.weights.items())


def test_an_imported_format_1_checkpoint_has_no_training_state() -> None:
    imported = read_checkpoint(FIXTURES / "format1-imported-siglip.pt")
    assert imported.training is None and imported.imported_from == "hf:tiny-siglip"
    assert imported.processor.preprocess.image_size == 32
