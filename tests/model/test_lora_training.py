"""A LoRA run from the outside: the checkpoint keeps the adapters apart from the frozen weights and resumes exactly;
every load (and so every export: ONNX, Hugging Face) folds them in, and what it gives equals the adapter model
within 1e-5; a run can start adapters on a plain checkpoint (``model.init``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import LoraConfig, config_from_dict, config_to_dict
from clipforge.data.base import decode_image
from clipforge.interop.load import from_pretrained
from clipforge.model.factory import build_checked_model
from clipforge.model.lora import has_adapters, holds_adapters, is_adapter_key
from clipforge.train.loop import train
from tests.conftest import tiny_config
from tests.interop.tiny_models import write_hf_clip

pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.1}
CAPTIONS = ["a small red circle", "a large blue square", "green", "a small yellow triangle, large", "red"]


def with_adapters(config):
    """``config`` (the tiny model) with adapters on both towers (the text tower's on attention only)."""
    config.model.image.lora = LoraConfig(**LORA)
    config.model.text.lora = LoraConfig(**{**LORA, "targets": ["attention"]})
    return config_from_dict(config_to_dict(config))  # validated again


def adapter_model(checkpoint: Path, weights: str = "raw"):
    """The model as the run trained it: adapters unmerged, in eval mode."""
    saved = read_checkpoint(checkpoint)
    model = build_checked_model(saved.config, saved.processor.tokenizer, saved.weights_for(weights), "test")
    return model.eval(), saved.processor


def inputs(processor, images: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    transform = processor.image_transform()
    pixels = torch.stack([transform(decode_image(path)) for path in sorted(images.glob("*.png"))[:5]])
    input_ids, attention_mask = processor.tokenizer(CAPTIONS, processor.context_length)
    return pixels, input_ids, attention_mask


def embeddings(model, pixels, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(input_ids, attention_mask)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, shapes manifest): the tiny model trained 8 steps with adapters on both towers and an EMA."""
    from tests.conftest import write_shapes_manifest

    folder = tmp_path_factory.mktemp("lora")
    manifest = write_shapes_manifest(folder / "shapes")
    train_section = {"steps": 8, "checkpoint_every": 4, "keep_checkpoints": 2, "ema": {"decay": 0.5}}
    train(with_adapters(tiny_config(manifest, folder / "run", train=train_section, optim={"lr": 1e-2})))
    return folder / "run", manifest


def test_the_checkpoint_keeps_adapters_and_frozen_weights_and_resumes_exactly(lora_run: tuple[Path, Path]) -> None:
    run, manifest = lora_run
    middle, last = read_checkpoint(run / "step_4.pt"), read_checkpoint(run / "last.pt")
    assert holds_adapters(last.weights)
    adapters = [key for key in last.weights if is_adapter_key(key)]
    assert any(key.startswith("image_tower") for key in adapters) and any(
        key.startswith("text_tower") for key in adapters
    )
    for key, value in last.weights.items():
        if key.startswith(("image_tower", "text_tower")) and not is_adapter_key(key):
            assert torch.equal(value, middle.weights[key]), f"{key} is frozen under LoRA"
    assert all(not torch.equal(last.weights[key], middle.weights[key]) for key in adapters if ".lora_B." in key)
    # the average covers what trains: the adapters, not the frozen tower weights
    towers = [key for key in last.ema if key.startswith(("image_tower", "text_tower"))]
    assert towers and all(is_adapter_key(key) for key in towers) and "image_head.proj.weight" in last.ema

    common = {"steps": 8, "checkpoint_every": 4, "ema": {"decay": 0.5}}
    config = with_adapters(tiny_config(manifest, run.parent / "resumed", train=common, optim={"lr": 1e-2}))
    resumed = read_checkpoint(train(config, resume=run / "step_4.pt").checkpoint)
    for key, value in last.weights.items():
        assert torch.equal(value, resumed.weights[key]), key
    for key, value in last.ema.items():
        assert torch.equal(value, resumed.ema[key]), key


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_every_load_folds_the_adapters_into_the_same_function(lora_run: tuple[Path, Path], weights: str) -> None:
    run, manifest = lora_run
    adapted, processor = adapter_model(run / "last.pt", weights)
    loaded = from_pretrained(run / "last.pt", weights=weights)
    assert not has_adapters(loaded.model) and not holds_adapters(loaded.model.state_dict())
    assert not loaded.config.model.image.lora.enabled and not loaded.config.model.text.lora.enabled
    assert not loaded.model.image_locked and not loaded.model.text_locked  # it is the trained tower, not a frozen one
    batch = inputs(processor, manifest.parent / "images")
    for expected, got in zip(embeddings(adapted, *batch), embeddings(loaded.model, *batch), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_onnx_export_of_a_lora_run_equals_the_adapter_model(lora_run: tuple[Path, Path], tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    run, manifest = lora_run
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(run / "last.pt"), "--out", str(out)]) == 0
    adapted, processor = adapter_model(run / "last.pt")
    pixels, input_ids, attention_mask = inputs(processor, manifest.parent / "images")
    image_expected, text_expected = embeddings(adapted, pixels, input_ids, attention_mask)
    image = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (image_got,) = image.run(None, {"pixel_values": pixels.numpy()})
    (text_got,) = text.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
    assert np.abs(image_got - image_expected.numpy()).max() < 1e-5
    assert np.abs(text_got - text_expected.numpy()).max() < 1e-5


def test_a_lora_fine_tune_of_a_hf_clip_exports_to_transformers_equal_to_the_adapter_model(
    tiny_checkpoint: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    transformers = pytest.importorskip("transformers")
    _, images = tiny_checkpoint
    folder = write_hf_clip(tmp_path / "released")
    imported = tmp_path / "imported.pt"
    assert main(["import", f"hf:{folder}", "--out", str(imported)]) == 0
    manifest = images.parent / "train.csv"
    model = {"init": str(imported), "image": {"lora": LORA}, "text": {"lora": LORA}}
    config = tiny_config(manifest, tmp_path / "run", model=model, train={"steps": 4}, optim={"lr": 1e-2})
    run = train(config)
    out = tmp_path / "hf"
    assert main(["export", "hf", "--checkpoint", str(run.checkpoint), "--out", str(out)]) == 0, capsys.readouterr()
    adapted, processor = adapter_model(run.checkpoint)
    pixels, input_ids, attention_mask = inputs(processor, images)
    image_expected, text_expected = embeddings(adapted, pixels, input_ids, attention_mask)
    exported = transformers.CLIPModel.from_pretrained(out).eval()
    with torch.no_grad():
        image_got = exported.get_image_features(pixel_values=pixels)
        text_got = exported.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    image_got = getattr(image_got, "pooler_output", image_got)
    text_got = getattr(text_got, "pooler_output", text_got)
    torch.testing.assert_close(torch.nn.functional.normalize(image_got, dim=-1), image_expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(text_got, dim=-1), text_expected, rtol=0, atol=1e-5)


def test_adapters_start_on_a_plain_checkpoint(tiny_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    model = {"init": str(checkpoint), "text": {"lora": LORA}}
    config = tiny_config(images.parent / "train.csv", tmp_path / "run", model=model, train={"steps": 2})
    result = read_checkpoint(train(config).checkpoint)
    start = read_checkpoint(checkpoint).weights
    assert holds_adapters(result.weights)
    frozen = {
        key: value for key, value in result.weights.items() if key.startswith("text_tower") and "lora_" not in key
    }
    for key, value in frozen.items():  # the text tower's own weights are the checkpoint's, under base_layer names
        assert torch.equal(value, start[key.replace(".base_layer.", ".")]), key
