"""Hosted open_clip towers in use: fine-tuning (locking/LiT with the feature cache, layer decay, activation
checkpointing), evaluation, search and explanation from the command line, ONNX export, and a missing open_clip."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge import from_pretrained
from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.interop.load import save_imported_checkpoint
from clipforge.model.locking import layer_ids
from tests.interop.test_finetune import finetune_config
from tests.interop.tiny_models import photos
from tests.interop.zoo_models import CAPTIONS, write_member

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("sentencepiece", reason="the tokenizer stand-ins are SentencePiece models trained here")


def imported(family: str, folder: Path) -> Path:
    """A clipforge checkpoint of the family's small member."""
    released = write_member(folder / "released", family)
    loaded = from_pretrained(f"open_clip:local-dir:{released}")
    return save_imported_checkpoint(loaded, folder / "model.pt", f"open_clip:local-dir:{released}")


def test_a_hosted_cnn_fine_tunes_with_layer_decay_and_a_partial_lock_then_explains(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    from clipforge.train.loop import train
    from clipforge.train.optim import tower_lr_scales
    from clipforge.train.run_log import read_metrics

    checkpoint = imported("ConvNeXt", tmp_path)
    model_section = {"image": {"lock": "all-but-last-1", "layer_decay": 0.5}}
    config = finetune_config(str(checkpoint), shapes_manifest, tmp_path / "run", model_section,
                             train={"steps": 12, "gradient_checkpointing": True})  # fmt: skip
    result = train(config)
    losses = [record["loss"] for record in read_metrics(result.output_dir / "metrics.jsonl")]
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses

    loaded = from_pretrained(result.checkpoint)
    tower = loaded.model.image_tower
    ids, stages = layer_ids(tower)
    assert stages == 4  # ConvNeXt's four stages are the tower's blocks
    trained = {name for name, layer in ids.items() if layer >= stages}  # the last stage and what follows
    before, after = read_checkpoint(checkpoint).weights, read_checkpoint(result.checkpoint).weights
    for name in ids:
        moved = not torch.equal(before[f"image_tower.{name}"], after[f"image_tower.{name}"])
        assert moved == (name in trained and "running_" not in name and "num_batches" not in name), name
    scales = tower_lr_scales(loaded.model, loaded.config.model)
    stem = next(name for name, layer in ids.items() if layer == 0)
    assert scales[id(dict(tower.named_parameters())[stem])] == pytest.approx(0.5**5)  # decay per stage to the stem

    out = tmp_path / "explain.png"
    image = shapes_manifest.parent / "images" / "small_red_circle.png"
    assert main(["explain", "--checkpoint", str(result.checkpoint), "--image", str(image), "--text", "a red circle",
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file()


def test_lit_on_a_hosted_image_tower_caches_its_features_and_keeps_it_fixed(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    """LiT: the hosted SigLIP2 trunk locked (and cached: one view, no random crop), the converted text tower trains."""
    from clipforge.train.loop import train

    checkpoint = imported("SigLIP2", tmp_path)
    config = finetune_config(str(checkpoint), shapes_manifest, tmp_path / "run", {"image": {"lock": True}},
                             data={"augment": {"scale_min": 1.0, "hflip": False}}, loss={"kind": "siglip"},
                             train={"steps": 6})  # fmt: skip
    result = train(config)
    assert any((tmp_path / "run" / "feature_cache").rglob("*.npy"))
    before, after = read_checkpoint(checkpoint).weights, read_checkpoint(result.checkpoint).weights
    assert all(torch.equal(before[key], after[key]) for key in before if key.startswith("image_tower."))
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("text_tower."))


def test_a_hosted_text_tower_model_embeds_searches_and_evaluates(shapes_manifest: Path, tmp_path: Path, capsys) -> None:
    checkpoint = imported("XLM-R text", tmp_path)
    images = shapes_manifest.parent / "images"
    assert (
        main(["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "emb")]) == 0
    )
    assert main(["search", "--index", str(tmp_path / "emb"), "--checkpoint", str(checkpoint), "--query", "a red circle",
                 "--top", "3"]) == 0  # fmt: skip
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", "--data", "kind=manifest",
                 f"path={shapes_manifest}"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "image_retrieval_recall@1" in out


@pytest.mark.parametrize(("family", "inline"), [("SigLIP2", True), ("XLM-R text", False)])
def test_a_hosted_model_exports_to_onnx_as_one_quiet_checked_file_set(
    family: str, inline: bool, tmp_path: Path, capfd, monkeypatch
) -> None:
    """One file set: weights inline; or, for a graph past the inline limit (here: every graph, the limit set to 0),
    in one ``<graph>.onnx.data`` file that the graph reads, and no other."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from clipforge.interop import onnx as onnx_export

    if not inline:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    checkpoint = imported(family, tmp_path)
    out = tmp_path / "onnx"
    capfd.readouterr()
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert printed.out.count("\n") == 1 and printed.err == "", printed  # the exporters' own lines held back
    graphs = ["image_encoder.onnx", "text_encoder.onnx"]
    data = [] if inline else [f"{graph}.data" for graph in graphs]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [*graphs, *data, "preprocess.json", "tokenizer"]
    )
    for graph in graphs:
        model = onnx.load(str(out / graph), load_external_data=False)
        locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}  # fmt: skip
        assert locations == (set() if inline else {f"{graph}.data"})

    loaded = from_pretrained(checkpoint)
    info = json.loads((out / "preprocess.json").read_text())
    assert info["padding"] == loaded.tokenizer.padding and info["pad_token_id"] == loaded.tokenizer.pad_token_id
    assert info["resize_mode"] == loaded.processor.preprocess.resize_mode and info["text_rule"]
    batch = loaded.processor(images=photos(), text=CAPTIONS)
    with torch.no_grad():
        expected = loaded.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    image = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = onnxruntime.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (image_got,) = image.run(None, {"pixel_values": batch["pixel_values"].numpy()})
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    (text_got,) = text.run(None, feeds)
    assert np.abs(image_got - expected.image_embeds.numpy()).max() < 1e-4
    assert np.abs(text_got - expected.text_embeds.numpy()).max() < 1e-4


def test_without_open_clip_a_hosted_model_names_the_extra_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    checkpoint = imported("ModifiedResNet", tmp_path)
    for module in [name for name in sys.modules if name == "open_clip" or name.startswith("open_clip.")]:
        monkeypatch.setitem(sys.modules, module, None)  # import open_clip now fails, as where it is not installed
    capsys.readouterr()
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'clipforge[open_clip]'" in err and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize(
    ("family", "explained"),
    [("ModifiedResNet", True), ("MobileCLIP (FastViT-MCi)", True), ("Swin", False), ("SigLIP2", False)],
)
def test_grad_cam_explains_a_hosted_cnn_and_a_hosted_transformer_is_refused(
    family: str, explained: bool, tmp_path: Path
) -> None:
    """Grad-CAM weighs the last stage of a convolutional trunk, before open_clip's attention pooling or projection;
    a transformer trunk gives tokens (a ViT) or channels-last maps (Swin), and explain says it cannot."""
    from clipforge.explain.heatmap import explain

    loaded = from_pretrained(imported(family, tmp_path))
    if not explained:
        with pytest.raises(ValueError, match="not a CNN"):
            explain(loaded, [photos()[0]], ["a photo"])
        return
    (explanation,) = explain(loaded, [photos()[0]], ["a photo"])[0]
    assert explanation.method == "gradcam" and explanation.heatmap.shape == (loaded.processor.image_size,) * 2
    assert explanation.heatmap.max() == pytest.approx(1.0) and explanation.heatmap.min() >= 0
