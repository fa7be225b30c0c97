"""The hosted text towers (Chinese-CLIP's BERT, AltCLIP's XLM-R) and the converted multilingual types through what
every model does: fine-tuning from ``model.init`` (locks, layer decay, the feature cache, an exact resume from the
checkpoint alone), explanations on their converted ViT, and ONNX export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge import from_pretrained, load_checkpoint
from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import config_from_dict
from clipforge.model.locking import layer_lr_scales
from tests.interop.tiny_models import (
    MULTILINGUAL_CAPTIONS,
    photos,
    write_hf_altclip,
    write_hf_chinese_clip,
    write_hf_metaclip_2,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def chinese_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_chinese_clip(tmp_path_factory.mktemp("hosted") / "chinese_clip")


@pytest.fixture(scope="module")
def altclip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_altclip(tmp_path_factory.mktemp("hosted") / "altclip")


def finetune_values(init: str, manifest: Path, output_dir: Path, image: dict, text: dict) -> dict:
    return {
        "model": {"init": init, "image": image, "text": text},
        "data": {"kind": "manifest", "path": str(manifest), "augment": {"scale_min": 0.9}},
        "optim": {"lr": 1e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 1},
        "train": {
            "steps": 6,
            "batch_size": 8,
            "output_dir": str(output_dir),
            "checkpoint_every": 3,
            "keep_checkpoints": 2,
            "seed": 0,
        },
        "logging": {"log_every": 1, "backends": [], "progress": False},
    }


def test_the_hosted_text_model_is_transformers_own_and_its_layers_decay(altclip: Path) -> None:
    loaded = from_pretrained(f"hf:{altclip}")
    tower = loaded.model.text_tower
    assert tower.describe() == "AltCLIPTextModel" and tower.output_dim == 48  # every token projected to 48
    assert json.loads(tower.hf_config_json())["model_type"] == "altclip_text_model"
    scales = layer_lr_scales(tower, 1.0, 0.5)  # K = 2 layers; the LayerNorm and projection after them train at 1
    assert scales["encoder.roberta.embeddings.word_embeddings.weight"] == 0.5**3
    assert scales["encoder.roberta.encoder.layers.1.output.dense.weight"] == 0.5
    assert scales["encoder.pre_LN.weight"] == scales["encoder.transformation.weight"] == 1.0
    assert tower.set_grad_checkpointing(True)


def test_fine_tuning_chinese_clip_locks_the_text_tower_and_resumes_from_the_checkpoint_alone(
    chinese_clip: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    from clipforge.train.loop import train

    imported = tmp_path / "released"  # a copy, removed before the resume
    shutil.copytree(chinese_clip, imported)
    values = finetune_values(
        f"hf:{imported}", shapes_manifest, tmp_path / "run", {"layer_decay": 0.8}, {"lock": "all-but-last-1"}
    )
    config = config_from_dict(values)
    full = train(config)
    final = read_checkpoint(full.checkpoint)
    assert final.hf_text_config is not None and final.config.model.text.kind == "hf"
    start = from_pretrained(f"hf:{imported}").model.state_dict()
    first_layer = "text_tower.encoder.encoder.layer.0.attention.self.query.weight"
    last_layer = "text_tower.encoder.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(final.weights[first_layer], start[first_layer])  # locked
    assert not torch.equal(final.weights[last_layer], start[last_layer])  # the last block trains

    shutil.rmtree(imported)
    resumed = train(config, resume=tmp_path / "run" / "step_3.pt")
    continued = read_checkpoint(resumed.checkpoint).weights
    for key, value in final.weights.items():
        assert torch.allclose(value, continued[key], atol=1e-6), key
    # and the checkpoint embeds as it trained, with no folder: its text model's config travels inside it
    loaded = load_checkpoint(full.checkpoint)
    tokens = loaded.processor.text(MULTILINGUAL_CAPTIONS)
    with torch.no_grad():
        assert torch.isfinite(loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"])).all()


def test_a_locked_hosted_text_tower_is_read_from_the_feature_cache(
    altclip: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    from clipforge.train.loop import train

    values = finetune_values(f"hf:{altclip}", shapes_manifest, tmp_path / "run", {}, {"lock": True})
    train(config_from_dict({**values, "train": {**values["train"], "steps": 2}}))
    assert any((tmp_path / "run" / "feature_cache").rglob("*.npy"))


def test_explain_rolls_out_the_converted_vit_of_a_hosted_text_model(chinese_clip: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "chinese_clip.pt"
    assert main(["import", f"hf:{chinese_clip}", "--out", str(checkpoint)]) == 0
    photo = tmp_path / "photo.png"
    photos()[0].save(photo)
    out = tmp_path / "explain.png"
    command = ["explain", "--checkpoint", str(checkpoint), "--image", str(photo), "--text", "a red circle"]
    assert main([*command, "--method", "rollout", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and out.stat().st_size > 0


@pytest.mark.parametrize("write", [write_hf_metaclip_2, write_hf_chinese_clip], ids=["metaclip_2", "chinese_clip"])
def test_onnx_export_of_the_multilingual_types(write, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint = tmp_path / "model.pt"
    assert main(["import", f"hf:{write(tmp_path / 'released')}", "--out", str(checkpoint)]) == 0
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    loaded = load_checkpoint(checkpoint)
    tokens = loaded.processor.text(MULTILINGUAL_CAPTIONS)
    session = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {name: value.numpy() for name, value in tokens.items()})
    with torch.no_grad():
        expected = loaded.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).numpy()
    assert np.abs(got - expected).max() < 1e-4
