"""Identical texts tie exactly, so evaluation does not depend on the batch size.

The hand-made text tower below adds an offset that grows with a row's position in its batch: a stand-in for a
batched kernel whose rounding depends on a row's neighbours (1e-4, far above float32 noise, so the outcome
rests on no luck). Without deduplication, two copies of one caption in different batch positions get different
embeddings and that noise decides the tie between the images that share it; with it, the tie is exact and the
pessimistic rule of ``retrieval_metrics`` / ``zeroshot_metrics`` decides, whatever the batch size.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from clipforge.data.manifest import ManifestSource
from clipforge.eval.features import encode_texts
from clipforge.eval.runner import evaluate_retrieval, evaluate_zeroshot
from clipforge.model import CLIPModel
from tests.eval.handmade import COLOURS, ColourWords, MeanColour, colour_processor

NOISE = 1e-4


class BatchNoisyColourWords(ColourWords):
    """ColourWords plus ``NOISE * (position in the batch)`` on the green channel; counts the rows it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows_seen = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = super().forward(input_ids, attention_mask)  # (B, 3)
        self.rows_seen += features.shape[0]
        position = torch.arange(features.shape[0], dtype=features.dtype)[:, None]
        return features + NOISE * position * torch.tensor([0.0, 1.0, 0.0])


def noisy_model() -> CLIPModel:
    towers = (MeanColour(), BatchNoisyColourWords(), nn.Identity(), nn.Identity())
    return CLIPModel(*towers, init_log_logit_scale=math.log(100)).eval()


# a red with some green in it: the text tower's noise on the green channel then moves a red image's score at
# first order (about 0.25 * NOISE, far above float32's 6e-8 near 1), not only at second order
ORANGE_RED = (255, 64, 0)


def write_shared_caption_set(folder: Path) -> Path:
    """Two identical (orange-)red images that share the caption "a red square", then a green and a blue one.

    Integer labels 0..3, one per image, for the zero-shot test.
    """
    rows = []
    for index, (name, caption) in enumerate(
        [("red", "a red square"), ("red", "a red square"), ("green", "a green square"), ("blue", "a blue square")]
    ):
        relative = f"{index}_{name}.png"
        Image.new("RGB", (12, 12), ORANGE_RED if name == "red" else COLOURS[name]).save(folder / relative)
        rows.append((relative, caption, index))
    manifest = folder / "shared.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)
    return manifest


def test_identical_texts_are_encoded_once_and_bit_identical() -> None:
    model = noisy_model()
    texts = ["a red square", "a green square", "a red square", "a blue square", "a red square"]
    features = encode_texts(model, colour_processor(), texts, batch_size=2)
    assert features.shape == (5, 3)
    assert torch.equal(features[0], features[2]) and torch.equal(features[0], features[4])
    assert model.text_tower.rows_seen == 3, "each distinct text goes through the tower once"
    assert not torch.equal(features[1], features[3])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_retrieval_with_a_shared_caption_does_not_depend_on_the_batch_size(tmp_path: Path, batch_size: int) -> None:
    source = ManifestSource(write_shared_caption_set(tmp_path))
    result = evaluate_retrieval(noisy_model(), colour_processor(), source, batch_size=batch_size)
    assert result.embeddings.captions == ["a red square", "a red square", "a green square", "a blue square"]
    # the pessimistic rule, by hand: text -> image, each red caption ties between the two identical red images
    # (rank 2); image -> text, each red image ties between its own caption and the other red image's (rank 2).
    # Green and blue find their own at rank 1 both ways.
    for direction in ("image", "text"):
        assert result.metrics[f"{direction}_retrieval_recall@1"] == 0.5
        assert result.metrics[f"{direction}_retrieval_recall@5"] == 1.0
        assert result.metrics[f"{direction}_retrieval_mean_rank"] == 1.5
        assert result.metrics[f"{direction}_retrieval_median_rank"] == 1.5


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_zeroshot_with_a_repeated_class_name_does_not_depend_on_the_batch_size(tmp_path: Path, batch_size: int) -> None:
    source = ManifestSource(write_shared_caption_set(tmp_path))
    result = evaluate_zeroshot(
        noisy_model(),
        colour_processor(),
        source,
        classnames=["red", "red", "green", "blue"],  # classes 0 and 1 share a name, as ImageNet's two "crane"s do
        templates=["a photo of a {}.", "a {} thing"],
        batch_size=batch_size,
    )
    # classes 0 and 1 get one and the same weight vector: each red image ties its true class with the other
    # red class, and the pessimistic rule counts the tie against it; green and blue are right
    assert result.metrics["acc1"] == 0.5
    assert result.confusion_matrix[0][1] == 1 and result.confusion_matrix[1][0] == 1
