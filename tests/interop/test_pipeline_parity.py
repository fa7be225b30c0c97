"""Imports and exports equal their source framework *through that framework's own preprocessing*, on photographs
that are not square (640 x 427 and 427 x 640): transformers' ``AutoProcessor``, open_clip's
``create_model_and_transforms``, an exported folder's own processor, and ``preprocess.json`` reproduced by hand.

Each parity check also shows it can fail: the same pixels with the other crop rounding (or the other resize) are
far off, so a test that passes is not one that could not see the difference.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge import from_pretrained, load_checkpoint
from clipforge.cli import main
from clipforge.data.transforms import MAX_ASPECT, build_image_transform
from clipforge.model.vision import resolve_image_preprocess
from tests.interop.tiny_models import (
    OPEN_CLIP_CONFIG,
    photos,
    pooled,
    write_hf_clip,
    write_hf_siglip,
    write_open_clip,
    write_open_clip_folder,
    write_trained_style_checkpoint,
)

transformers = pytest.importorskip("transformers")

EXACT = 1e-5  # max |difference| of unit-norm embeddings
SENSITIVE = 1e-3  # ... and what one pixel of crop offset does to them, at least


def clipforge_embeddings(loaded, preprocess=None) -> torch.Tensor:
    """clipforge's own pipeline: the checkpoint's transform, then ``encode_image`` (unit norm)."""
    transform = build_image_transform(preprocess or loaded.processor.preprocess)
    with torch.no_grad():
        return loaded.model.float().eval().encode_image(torch.stack([transform(photo) for photo in photos()]))


def transformers_embeddings(folder: Path, model_class: str, **processor_kwargs) -> torch.Tensor:
    """transformers' own pipeline: ``AutoProcessor`` (or the image processor, given kwargs), then
    ``get_image_features``, normalized."""
    if processor_kwargs:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, **processor_kwargs)
    else:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    pixels = processor(images=photos(), return_tensors="pt")["pixel_values"]
    model = getattr(transformers, model_class).from_pretrained(folder).eval()
    with torch.no_grad():
        return F.normalize(pooled(model.get_image_features(pixel_values=pixels)), dim=-1)


def max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).abs().max())


def test_the_default_processor_is_transformers_torchvision_backend(tmp_path: Path) -> None:
    """transformers 5 picks the torchvision backend when torchvision is installed; clipforge follows it."""
    for folder in (write_hf_clip(tmp_path / "clip"), write_hf_siglip(tmp_path / "siglip")):
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        assert processor.backend == "torchvision", type(processor).__name__


# ----------------------------------------------------------------------------------------------
# Imports
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "write", "model_class"),
    [("clip", write_hf_clip, "CLIPModel"), ("siglip", write_hf_siglip, "SiglipModel")],
)
def test_a_hugging_face_import_matches_transformers_own_processor(family, write, model_class, tmp_path: Path) -> None:
    folder = write(tmp_path / family)
    loaded = from_pretrained(f"hf:{folder}")
    image = loaded.config.model.image
    expected_mode = "shortest" if family == "clip" else "squash"
    assert (image.resize_mode, image.crop_rounding, image.resize_backend) == (expected_mode, "floor", "torchvision")

    ours = clipforge_embeddings(loaded)
    assert max_difference(ours, transformers_embeddings(folder, model_class)) < EXACT
    # transformers' PIL backend is the same rule resized by PIL: clipforge's pil backend equals it
    preprocess = dataclasses.replace(resolve_image_preprocess(image), resize_backend="pil")
    pil = transformers_embeddings(folder, model_class, backend="pil")
    assert max_difference(clipforge_embeddings(loaded, preprocess), pil) < EXACT
    # what the import did before: short side + torchvision's crop rounding
    before = dataclasses.replace(resolve_image_preprocess(image), resize_mode="shortest", crop_rounding="round")
    assert max_difference(clipforge_embeddings(loaded, before), ours) > SENSITIVE


def open_clip_embeddings(model_name: str, **kwargs) -> torch.Tensor:
    open_clip = pytest.importorskip("open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, **kwargs)
    with torch.no_grad():
        return model.eval().encode_image(torch.stack([preprocess(photo) for photo in photos()]), normalize=True)


def test_an_open_clip_import_matches_open_clip_own_transform(tmp_path: Path) -> None:
    config_path, weights, _ = write_open_clip(tmp_path, name="tiny-parity")
    loaded = from_pretrained(f"open_clip:{config_path}:{weights}")
    image = loaded.config.model.image
    assert (image.resize_mode, image.crop_rounding, image.resize_backend) == ("shortest", "round", "pil")
    ours = clipforge_embeddings(loaded)
    assert max_difference(ours, open_clip_embeddings("tiny-parity", pretrained=str(weights))) < EXACT
    floor = dataclasses.replace(resolve_image_preprocess(image), crop_rounding="floor")
    assert max_difference(clipforge_embeddings(loaded, floor), ours) > SENSITIVE


def test_a_squash_open_clip_model_matches_open_clip_own_transform(tmp_path: Path) -> None:
    """A SigLIP-style open_clip model the built-in towers express (logit bias, bidirectional text, squash resize
    with SigLIP's mean/std) from a hub-style folder; open_clip's own SigLIP models have timm towers (refused)."""
    config = {**OPEN_CLIP_CONFIG, "init_logit_bias": -10.0}
    config["text_cfg"] = {**OPEN_CLIP_CONFIG["text_cfg"], "no_causal_mask": True, "pool_type": "last"}
    preprocess_cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    config_path, weights = write_open_clip_folder(tmp_path / "folder", preprocess_cfg, config, name="tiny-squash")
    loaded = from_pretrained(f"open_clip:{config_path}:{weights}")
    image = loaded.config.model.image
    assert (image.resize_mode, image.interpolation, image.mean) == ("squash", "bilinear", [0.5] * 3)
    ours = clipforge_embeddings(loaded)
    assert max_difference(ours, open_clip_embeddings(f"local-dir:{tmp_path / 'folder'}")) < EXACT
    shortest = dataclasses.replace(resolve_image_preprocess(image), resize_mode="shortest")
    assert max_difference(clipforge_embeddings(loaded, shortest), ours) > SENSITIVE


def test_open_clip_longest_is_logged_as_not_representable(tmp_path: Path, caplog) -> None:
    config_path, weights = write_open_clip_folder(tmp_path / "folder", {"resize_mode": "longest"})
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        loaded = from_pretrained(f"open_clip:{config_path}:{weights}")
    assert "resize_mode='longest'" in caplog.text and "no clipforge counterpart" in caplog.text
    assert loaded.config.model.image.resize_mode == "shortest"


# ----------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------
def import_checkpoint(spec: str, path: Path) -> Path:
    assert main(["import", spec, "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize(
    ("family", "write", "model_class"),
    [("clip", write_hf_clip, "CLIPModel"), ("siglip", write_hf_siglip, "SiglipModel")],
)
def test_an_hf_export_ships_a_processor_that_matches_the_checkpoint(
    family, write, model_class, tmp_path: Path, caplog
) -> None:
    checkpoint = import_checkpoint(f"hf:{write(tmp_path / 'released')}", tmp_path / "imported.pt")
    out = tmp_path / "exported"
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert main(["export", "hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "image processor differs" not in caplog.text  # an imported rule is transformers' own
    processor = json.loads((out / "preprocessor_config.json").read_text())
    expected = "CLIPImageProcessor" if family == "clip" else "SiglipImageProcessor"
    assert processor["image_processor_type"] == expected
    ours = clipforge_embeddings(load_checkpoint(checkpoint))
    assert max_difference(ours, transformers_embeddings(out, model_class)) < EXACT


@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_a_clipforge_trained_model_exports_its_resize_rule(resize_mode: str, tmp_path: Path, caplog) -> None:
    """clipforge's own towers resize with PIL: transformers' PIL backend reproduces them exactly (given the
    crop rounding transformers has); the default backend, and a half-to-even crop, are warned about."""
    image = {"resize_mode": resize_mode, "crop_rounding": "floor", "interpolation": "bilinear"}
    checkpoint, _ = write_trained_style_checkpoint(tmp_path, image=image)
    out = tmp_path / "exported"
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert main(["export", "hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert "backend='pil'" in caplog.text and "half to even" not in caplog.text
    processor = json.loads((out / "preprocessor_config.json").read_text())
    if resize_mode == "squash":
        assert processor["image_processor_type"] == "SiglipImageProcessor"
        assert processor["size"] == {"height": 32, "width": 32}
    else:
        assert processor["image_processor_type"] == "CLIPImageProcessor"
        assert processor["size"] == {"shortest_edge": 32} and processor["crop_size"] == {"height": 32, "width": 32}
    ours = clipforge_embeddings(load_checkpoint(checkpoint))
    assert max_difference(ours, transformers_embeddings(out, "CLIPModel", backend="pil")) < EXACT

    caplog.clear()
    (tmp_path / "rounded").mkdir()
    rounded, _ = write_trained_style_checkpoint(tmp_path / "rounded", image={"crop_rounding": "round"})
    with caplog.at_level(logging.WARNING, logger="clipforge"):
        assert main(["export", "hf", "--checkpoint", str(rounded), "--out", str(tmp_path / "rounded-hf")]) == 0
    assert "rounds half to even" in caplog.text


# ----------------------------------------------------------------------------------------------
# ONNX: preprocess.json alone reproduces the pixels
# ----------------------------------------------------------------------------------------------
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def reference_preprocess(info: dict, image: Image.Image) -> np.ndarray:
    """(3, S, S) float32 pixels from ``preprocess.json``'s fields and PIL / torchvision alone, written from the
    export's documentation, not from clipforge's code."""
    size, short_side = info["image_size"], info.get("resize_size")
    if info["resize_mode"] == "squash":
        target = (size, size)
    else:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if long > info["max_aspect"] * short:  # never for a photograph
            raise AssertionError("the photographs are within max_aspect")
        new_long = int(short_side * long / short)
        target = (short_side, new_long) if width <= height else (new_long, short_side)
    if info["resize_backend"] == "pil":
        resized = np.asarray(image.resize(target, resample=PIL_FILTERS[info["interpolation"]]))
    else:
        from torchvision.transforms.v2 import InterpolationMode, functional

        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        mode = InterpolationMode(info["interpolation"])
        resized = functional.resize(tensor, [target[1], target[0]], interpolation=mode).permute(1, 2, 0).numpy()
    if info["resize_mode"] == "shortest":
        height, width = resized.shape[:2]
        offset = (lambda cut: cut // 2) if info["crop_rounding"] == "floor" else (lambda cut: int(round(cut / 2)))
        top, left = offset(height - size), offset(width - size)
        resized = resized[top : top + size, left : left + size]
    pixels = (resized.astype(np.float32) / 255.0 - np.array(info["mean"], np.float32)) / np.array(
        info["std"], np.float32
    )
    return pixels.transpose(2, 0, 1).astype(np.float32)


def source_checkpoint(kind: str, folder: Path) -> Path:
    if kind == "hf-clip":
        return import_checkpoint(f"hf:{write_hf_clip(folder / 'released')}", folder / "model.pt")
    if kind == "open_clip":
        config_path, weights, _ = write_open_clip(folder / "released", name="tiny-onnx")
        return import_checkpoint(f"open_clip:{config_path}:{weights}", folder / "model.pt")
    preprocess_cfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    config_path, weights = write_open_clip_folder(folder / "released", preprocess_cfg, name="tiny-onnx-squash")
    return import_checkpoint(f"open_clip:{config_path}:{weights}", folder / "model.pt")


@pytest.mark.parametrize("kind", ["hf-clip", "open_clip", "open_clip-squash"])
def test_an_onnx_export_is_reproduced_from_preprocess_json_alone(kind: str, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    checkpoint = source_checkpoint(kind, tmp_path)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    info = json.loads((out / "preprocess.json").read_text())
    assert info["max_aspect"] == MAX_ASPECT and info["resize_rule"]
    pixels = np.stack([reference_preprocess(info, photo) for photo in photos()])
    session = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixel_values": pixels})
    ours = clipforge_embeddings(load_checkpoint(checkpoint)).numpy()
    assert np.abs(got - ours).max() < 1e-4
