"""ONNX export: both graphs run in onnxruntime at a batch size the export never saw and match PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.cli import main
from clipforge.data.base import decode_image
from clipforge.interop.load import load_checkpoint

onnxruntime = pytest.importorskip("onnxruntime")


def test_exported_graphs_match_pytorch_at_a_new_batch_size(tiny_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    loaded = load_checkpoint(checkpoint)
    transform = loaded.processor.image_transform()

    paths = sorted(images.glob("*.png"))[:5]  # batch 5: the export traced batch 2 and checked batch 3
    pixels = torch.stack([transform(decode_image(path)) for path in paths])
    captions = ["a small red circle", "a large blue square", "green", "a small yellow triangle, large", "red"]
    input_ids, attention_mask = loaded.tokenizer(captions, loaded.config.model.text.context_length)
    with torch.no_grad():
        image_expected = loaded.model.encode_image(pixels).numpy()
        text_expected = loaded.model.encode_text(input_ids, attention_mask).numpy()
    image_session = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text_session = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (image_got,) = image_session.run(None, {"pixel_values": pixels.numpy()})
    (text_got,) = text_session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    assert np.abs(image_got - image_expected).max() < 1e-4
    assert np.abs(text_got - text_expected).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(text_got, axis=1), 1.0, atol=1e-5)  # normalized embeddings
    metadata = image_session.get_modelmeta().custom_metadata_map
    assert float(metadata["log_logit_scale"]) == pytest.approx(loaded.model.log_logit_scale.item())
    assert int(metadata["embed_dim"]) == image_expected.shape[1]
    preprocess = json.loads((out / "preprocess.json").read_text())
    assert preprocess["image_size"] == pixels.shape[-1] and preprocess["context_length"] > 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_an_existing_export_is_not_overwritten(tiny_checkpoint: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    checkpoint, _ = tiny_checkpoint
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "image_encoder.onnx").write_bytes(b"keep me")
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "image_encoder.onnx exists already" in err and "--overwrite" in err
    assert (out / "image_encoder.onnx").read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.onnx"]  # nothing else written either
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert (out / "image_encoder.onnx").read_bytes() != b"keep me" and (out / "text_encoder.onnx").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".clipforge-scratch")]


def test_any_tower_kind_exports_a_torchvision_cnn_with_a_hugging_face_encoder(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    """No Hugging Face counterpart exists for this pair, but ONNX takes it: checked against PyTorch at export."""
    from clipforge.interop.onnx import export_onnx
    from clipforge.train.loop import train
    from tests.conftest import tiny_config, write_tiny_bert

    bert = write_tiny_bert(tmp_path / "bert")
    model = {
        "image": {"kind": "torchvision", "name": "resnet18", "image_size": 32},
        "text": {"kind": "hf", "name": str(bert), "context_length": 16, "pooling": "mean", "tokenizer": {"kind": "hf"}},
    }
    result = train(
        tiny_config(shapes_manifest, tmp_path / "run", model=model, train={"steps": 2, "checkpoint_every": 2})
    )
    export = export_onnx(load_checkpoint(result.checkpoint), tmp_path / "onnx")
    assert max(export.image_max_difference, export.text_max_difference) < 1e-4
    session = onnxruntime.InferenceSession(str(export.text_encoder), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert (tmp_path / "onnx" / "tokenizer" / "tokenizer_config.json").is_file()
