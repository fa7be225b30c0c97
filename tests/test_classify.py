"""``clipforge classify``: probabilities over given labels with a prompt ensemble, table and bar chart."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.classify import classify_images, parse_labels
from clipforge.cli import main
from clipforge.data.base import decode_image
from clipforge.eval.features import encode_texts
from clipforge.interop.load import load_checkpoint


def test_labels_are_split_stripped_and_deduplicated() -> None:
    assert parse_labels("cat, dog,car,,dog ") == ["cat", "dog", "car"]
    with pytest.raises(ValueError, match="at least two"):
        parse_labels("cat")


def test_probabilities_are_the_softmax_over_the_prompt_ensemble(tiny_checkpoint, tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    loaded = load_checkpoint(checkpoint)
    files = [images / "large_red_circle.png", images / "small_blue_square.png"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    labels = ["red circle", "blue square", "green triangle"]
    templates = ["a {}", "a large {}"]
    result = classify_images(loaded, [*files, broken], labels, templates)
    assert result.paths == [str(f.resolve()) for f in files]
    assert [Path(f["id"]).name for f in result.failed] == ["broken.png"]
    assert result.probabilities.shape == (2, 3)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # reference, written plainly: class vector = normalized mean of the normalized template embeddings
    weights = []
    for label in labels:
        prompts = encode_texts(loaded.model, loaded.processor, [t.format(label) for t in templates])
        weights.append(torch.nn.functional.normalize(prompts.mean(0), dim=0))
    image_embeddings = _embed_files(loaded, files)
    logits = loaded.model.log_logit_scale.exp().item() * image_embeddings @ torch.stack(weights).T
    np.testing.assert_allclose(result.probabilities, logits.softmax(-1).numpy(), rtol=1e-4, atol=1e-5)


def _embed_files(loaded, files: list[Path]) -> torch.Tensor:
    transform = loaded.processor.image_transform()
    with torch.inference_mode():
        return loaded.model.encode_image(torch.stack([transform(decode_image(f)) for f in files]))


def test_cli_prints_probabilities_and_draws_bars(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint, images = tiny_checkpoint
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("large_red_circle.png", "small_green_triangle.png"):
        shutil.copy(images / name, folder / name)
    plot = tmp_path / "bars.png"
    argv = [
        "classify",
        "--checkpoint",
        str(checkpoint),
        "--labels",
        "circle,triangle",
        str(folder),
        "--plot",
        str(plot),
    ]
    assert main([*argv, "--templates", "a {}", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("%") == 4 and "large_red_circle.png" in out and "small_green_triangle.png" in out
    assert plot.stat().st_size > 1000
    assert main(["classify", "--checkpoint", str(checkpoint), "--labels", "cat", str(folder)]) == 2
    assert "at least two" in capsys.readouterr().err
