"""SigLIP 2's NaFlex (variable resolution): the packed patches equal transformers' ``Siglip2ImageProcessor`` on any
image (generated sizes, both backends), the grid is its grid, training views keep their aspect ratio at a fixed
batch shape, and the hosted tower trains (locked with the feature cache, layer decay, checkpointing), evaluates,
searches, and is refused where it has no counterpart (explain, ONNX) with one clear line."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipforge import from_pretrained
from clipforge.cli import main
from clipforge.config import AugmentConfig, ConfigError, config_from_dict
from clipforge.data.naflex import naflex_grid, pack_batch, packed_width, unpack
from clipforge.data.transforms import ImagePreprocess, build_image_transform
from clipforge.model.locking import layer_lr_scales
from tests.interop.test_pipeline_parity import SENSITIVE
from tests.interop.tiny_models import NAFLEX_PATCH, NAFLEX_PATCHES, photos, write_hf_siglip2

transformers = pytest.importorskip("transformers")
siglip2_processing = pytest.importorskip("transformers.models.siglip2.image_processing_siglip2")


def naflex_preprocess(patch_size: int = 8, budget: int = 24, backend: str = "torchvision") -> ImagePreprocess:
    return ImagePreprocess(
        64,
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "bilinear",
        resize_mode="naflex",
        resize_backend=backend,
        patch_size=patch_size,
        max_num_patches=budget,
    )


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def siglip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_siglip2(tmp_path_factory.mktemp("naflex") / "siglip2")


@pytest.fixture(scope="module")
def checkpoint(siglip2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("naflex-checkpoint") / "siglip2.pt"
    assert main(["import", f"hf:{siglip2}", "--out", str(path)]) == 0
    return path


# ----------------------------------------------------------------------------------------------
# The packed patches
# ----------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    patch_size=st.sampled_from([8, 14, 16]),
    budget=st.integers(1, 1024),
)
def test_the_grid_is_transformers_grid(height: int, width: int, patch_size: int, budget: int) -> None:
    rows, cols = naflex_grid(height, width, patch_size, budget)
    expected = siglip2_processing.get_image_size_for_max_num_patches(height, width, patch_size, budget)
    assert (rows * patch_size, cols * patch_size) == expected
    assert rows * cols <= max(budget, 1)


@settings(max_examples=20, deadline=None)
@given(
    width=st.integers(1, 90),
    height=st.integers(1, 90),
    budget=st.integers(1, 40),
    backend=st.sampled_from(["torchvision", "pil"]),
)
def test_the_packed_patches_are_transformers_processor_output(width: int, height: int, budget: int, backend: str):
    image = noise_image(width, height, seed=width * 100 + height)
    processor = siglip2_processing.Siglip2ImageProcessor(patch_size=8, max_num_patches=budget)
    if backend == "pil":
        processor = transformers.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=budget)
    expected = processor(images=[image], return_tensors="pt")
    packed = build_image_transform(naflex_preprocess(8, budget, backend))(image)
    assert packed.shape == (budget, packed_width(8))
    pixel_values, mask, shapes = unpack(packed[None])
    assert torch.equal(mask, expected["pixel_attention_mask"].int())
    assert torch.equal(shapes, expected["spatial_shapes"])
    assert (pixel_values - expected["pixel_values"]).abs().max() < 1e-5
    again = pack_batch(expected["pixel_values"], expected["pixel_attention_mask"], expected["spatial_shapes"])
    assert (again - packed[None]).abs().max() < 1e-5


def test_a_photo_keeps_its_aspect_ratio_and_the_import_sees_it(siglip2: Path) -> None:
    """The 640 x 427 photograph is a 13 x 19 grid, the portrait one 19 x 13; squashing it to the position table's
    own square (what a fixed-resolution import would do) gives other embeddings."""
    loaded = from_pretrained(f"hf:{siglip2}")
    pixels = loaded.processor.images(photos())
    _, mask, shapes = unpack(pixels)
    assert shapes.tolist() == [[13, 19], [19, 13]] and mask.sum(dim=1).tolist() == [247, 247]
    assert pixels.shape == (2, NAFLEX_PATCHES, packed_width(NAFLEX_PATCH))
    square = dataclasses.replace(loaded.processor.preprocess, max_num_patches=16)  # a 4 x 4 grid: the table's own
    squashed = torch.stack([build_image_transform(square)(photo.resize((64, 64))) for photo in photos()])
    with torch.no_grad():
        ours, other = loaded.model.encode_image(pixels), loaded.model.encode_image(squashed)
    assert (ours - other).abs().max() > SENSITIVE


def test_training_views_keep_the_aspect_ratio_at_one_batch_shape() -> None:
    preprocess = naflex_preprocess(8, 24)
    image = noise_image(120, 40)  # 3:1
    evaluation = build_image_transform(preprocess)(image)
    # no crop, no flip, no colour: the training view is the evaluation view
    torch.manual_seed(0)
    assert torch.equal(build_image_transform(preprocess, AugmentConfig(scale_min=1.0))(image), evaluation)
    crops = build_image_transform(preprocess, AugmentConfig(scale_min=0.3, hflip=True))
    views = []
    for seed in range(8):
        torch.manual_seed(seed)
        views.append(crops(image))
        assert views[-1].shape == evaluation.shape  # padded to the budget: every batch has one shape
        _, mask, grid = unpack(views[-1][None])
        rows, cols = grid[0].tolist()
        assert int(mask.sum()) == rows * cols and cols >= 2 * rows  # still wide: aspect within 3/4..4/3 of 3:1
    assert sum(not torch.equal(view, evaluation) for view in views) >= 4  # the crops are random


# ----------------------------------------------------------------------------------------------
# The hosted tower
# ----------------------------------------------------------------------------------------------
def test_the_hosted_tower_has_blocks_for_locking_layer_decay_and_checkpointing(siglip2: Path) -> None:
    tower = from_pretrained(f"hf:{siglip2}").model.image_tower
    scales = layer_lr_scales(tower, 1.0, 0.5)  # K = 2 encoder layers
    assert scales["model.embeddings.patch_embedding.weight"] == 0.5**3
    assert scales["model.encoder.layers.0.mlp.fc1.weight"] == 0.5**2
    assert scales["model.encoder.layers.1.mlp.fc1.weight"] == 0.5
    assert scales["model.head.probe"] == scales["model.post_layernorm.weight"] == 1.0
    assert len(tower.sharding_units()) == 2
    pixels = from_pretrained(f"hf:{siglip2}").processor.images(photos()[:1])
    gradients = []
    for checkpointing in (False, True):
        tower.zero_grad()
        assert tower.set_grad_checkpointing(checkpointing)
        tower.train()
        tower(pixels).sum().backward()
        gradients.append(tower.model.encoder.layers[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)
    with pytest.raises(ValueError, match=r"takes packed patches \(batch, max_num_patches, 771\)"):
        tower(torch.zeros(1, 3, 64, 64))


def naflex_run(init: str, manifest: Path, output_dir: Path, image: dict, **train) -> dict:
    return {
        "model": {"init": init, "image": image},
        "data": {"kind": "manifest", "path": str(manifest), "augment": {"scale_min": 1.0}},
        "loss": {"kind": "siglip"},
        "optim": {"lr": 1e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 1},
        "train": {"steps": 4, "batch_size": 8, "output_dir": str(output_dir), "checkpoint_every": 2, **train},
        "logging": {"log_every": 1, "backends": [], "progress": False},
    }


def test_a_locked_naflex_tower_trains_its_heads_from_the_feature_cache(
    siglip2: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    from clipforge.checkpoint import read_checkpoint
    from clipforge.train.loop import train

    values = naflex_run(f"hf:{siglip2}", shapes_manifest, tmp_path / "run", {"lock": True})
    result = train(config_from_dict(values))
    assert any((tmp_path / "run" / "feature_cache").rglob("*.npy"))
    imported = from_pretrained(f"hf:{siglip2}").model.state_dict()
    trained = read_checkpoint(result.checkpoint).weights
    tower_keys = [key for key in imported if key.startswith("image_tower.")]
    assert tower_keys and all(torch.equal(trained[key], imported[key]) for key in tower_keys)  # locked
    assert not torch.equal(trained["text_head.proj.weight"], imported["text_head.proj.weight"])  # trained


def test_evaluation_search_and_classify_take_the_packed_patches(checkpoint: Path, shapes_manifest: Path, tmp_path):
    images = shapes_manifest.parent / "images"
    data = ["--data", "kind=manifest", f"path={shapes_manifest}", "--device", "cpu"]
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", *data]) == 0
    index = tmp_path / "index"
    assert main(["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(index)]) == 0
    query = ["--index", str(index), "--checkpoint", str(checkpoint), "--top", "3", "--device", "cpu"]
    assert main(["search", *query, "--query", "a red circle"]) == 0
    assert main(["classify", "--checkpoint", str(checkpoint), "--labels", "circle,square", str(images)]) == 0


def test_explain_and_onnx_refuse_the_naflex_tower_in_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    photo = tmp_path / "photo.png"
    photos()[0].save(photo)
    capsys.readouterr()
    explain = ["explain", "--checkpoint", str(checkpoint), "--image", str(photo), "--text", "a", "--out"]
    assert main([*explain, str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no convolutional block for Grad-CAM and no class-token attention for rollout" in err
    assert err.count("\n") == 1
    assert main(["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "NaFlex image tower" in err and "clipforge export hf" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "onnx" / "image_encoder.onnx").exists()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ({"kind": "naflex", "max_num_patches": 64}, "resize_mode='shortest'"),
        ({"kind": "vit", "resize_mode": "naflex"}, "is for the NaFlex tower only"),
        ({"kind": "naflex", "resize_mode": "naflex"}, "needs a positive patch budget"),
        ({"kind": "naflex", "resize_mode": "naflex", "max_num_patches": 10**9}, "hold more pixels than"),
    ],
)
def test_a_naflex_config_that_cannot_work_is_refused(image: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"image": {"patch_size": 16, "image_size": 64, **image}}})


# ----------------------------------------------------------------------------------------------
# The shipped recipe
# ----------------------------------------------------------------------------------------------
def test_the_finetune_siglip2_recipe_trains_an_imported_siglip2_and_resumes_without_it(
    siglip2: Path, shapes_manifest: Path, tmp_path: Path
) -> None:
    """``clipforge train finetune-siglip2`` as shipped, on a tiny random SigLIP 2 folder and the shapes: it trains,
    validates (best.pt), and resumes from its checkpoint alone once the imported folder is gone."""
    from clipforge.checkpoint import read_checkpoint
    from clipforge.train.run_log import read_metrics

    imported, run = tmp_path / "siglip2", tmp_path / "run"
    imported.mkdir()
    for item in siglip2.iterdir():
        (imported / item.name).write_bytes(item.read_bytes())
    validation = f"[{{name: val, task: retrieval, data: {{kind: manifest, path: '{shapes_manifest}'}}}}]"
    command = ["train", "finetune-siglip2", f"model.init=hf:{imported}", "data.kind=manifest"]
    command += [f"data.path={shapes_manifest}", "data.num_workers=0", f"eval.tasks={validation}", "eval.every=2"]
    command += ["eval.batch_size=8", "optim.lr=1e-3", "schedule.warmup_steps=1", "train.steps=4"]
    command += ["train.batch_size=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    command += [f"train.output_dir={run}", "logging.backends=[]", "logging.progress=false", "logging.log_every=1"]
    assert main(command) == 0
    assert (run / "best.pt").is_file()
    final = read_checkpoint(run / "last.pt")
    assert final.config.model.image.kind == "naflex" and final.config.train.precision == "auto"
    losses = [record["loss"] for record in read_metrics(run / "metrics.jsonl") if "loss" in record]
    assert len(losses) == 4 and losses[-1] < losses[0], losses

    shutil.rmtree(imported)  # resuming rebuilds the model from the checkpoint alone: nothing is imported again
    assert main([*command, "--resume", str(run / "step_2.pt")]) == 0
    continued = read_checkpoint(run / "last.pt").weights
    for key, value in final.weights.items():
        assert torch.allclose(value, continued[key], atol=1e-6), key
