"""Retrieval metrics: hand-computed cases, and the blockwise code against plain full-matrix references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipforge.eval.retrieval import rank_summary, rank_to_recall, retrieval_metrics, retrieval_ranks

# A hand-made score table. With identity image features, s(i, j) = text_features[j, i] exactly, so every
# score (and every tie) is whatever is written here. Rows: captions; columns: images 0..3.
HAND_SCORES = [
    [0.5, 0.5, 0.1, 0.0],  # caption 0 -> image 0, ties with image 1: rank 2
    [0.9, 0.2, 0.8, 0.0],  # caption 1 -> image 0: rank 1
    [0.7, 0.3, 0.3, 0.0],  # caption 2 -> image 1, image 0 above and image 2 tied: rank 3
    [0.1, 0.2, 0.8, 0.0],  # caption 3 -> image 2: rank 1
    [0.0, 0.0, 0.0, 0.6],  # caption 4 -> image 3: rank 1
    [0.0, 0.0, 0.0, 0.6],  # caption 5 -> image 3: rank 1
]
HAND_TEXT_TO_IMAGE = [0, 0, 1, 2, 3, 3]
# Image -> text, per image (one column of the table):
#   image 0: correct {0.5, 0.9}, best 0.9, the wrong 0.7 sits between them and does not count: rank 1
#   image 1: correct 0.3, wrong 0.5 above it: rank 2
#   image 2: correct 0.8, wrong caption 1 ties at 0.8: pessimistic rank 2
#   image 3: two correct captions tied at 0.6 with each other, nothing wrong above: rank 1
HAND_IMAGE_RETRIEVAL_RANKS = [2, 1, 3, 1, 1, 1]
HAND_TEXT_RETRIEVAL_RANKS = [1, 2, 2, 1]


def _hand_case(dtype=torch.float32):
    text_features = torch.tensor(HAND_SCORES, dtype=dtype)
    image_features = torch.eye(4, dtype=dtype)
    return image_features, text_features, torch.tensor(HAND_TEXT_TO_IMAGE)


def _reference_ranks_by_definition(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[list[int], list[int]]:
    """The definitions, literally, one query at a time. scores: (N_txt, N_img) caption-by-image."""
    num_texts, num_images = scores.shape
    image_ranks = []
    for j in range(num_texts):
        own = scores[j, text_to_image[j]]
        image_ranks.append(1 + sum(1 for i in range(num_images) if i != text_to_image[j] and scores[j, i] >= own))
    text_ranks = []
    for i in range(num_images):
        correct = [j for j in range(num_texts) if text_to_image[j] == i]
        best = max(scores[j, i] for j in correct)
        text_ranks.append(1 + sum(1 for j in range(num_texts) if text_to_image[j] != i and scores[j, i] >= best))
    return image_ranks, text_ranks


def _reference_ranks_by_sorting(scores: np.ndarray, text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank = 1 + position in a descending sort; valid only without ties (continuous random scores)."""
    image_order = np.argsort(-scores, axis=1)  # (N_txt, N_img)
    image_ranks = 1 + np.argmax(image_order == text_to_image[:, None], axis=1)
    text_order = np.argsort(-scores.T, axis=1)  # (N_img, N_txt)
    is_correct = text_to_image[text_order] == np.arange(scores.shape[1])[:, None]
    text_ranks = 1 + np.argmax(is_correct, axis=1)  # first correct caption in the sorted list
    return image_ranks, text_ranks


def _random_assignment(generator: torch.Generator, num_images: int, num_extra: int) -> torch.Tensor:
    """Every image gets one caption, then num_extra more go to random images; shuffled."""
    text_to_image = torch.cat([torch.arange(num_images), torch.randint(num_images, (num_extra,), generator=generator)])
    return text_to_image[torch.randperm(len(text_to_image), generator=generator)]


def test_hand_case_ranks_follow_pessimistic_and_multi_caption_rules():
    image_ranks, text_ranks = retrieval_ranks(*_hand_case())
    assert image_ranks.tolist() == HAND_IMAGE_RETRIEVAL_RANKS
    assert text_ranks.tolist() == HAND_TEXT_RETRIEVAL_RANKS
    assert image_ranks.dtype == torch.long


def test_hand_case_metrics():
    metrics = retrieval_metrics(*_hand_case(), ks=(1, 2, 5))
    expected = {
        "image_retrieval_recall@1": 4 / 6,
        "image_retrieval_recall@2": 5 / 6,
        "image_retrieval_recall@5": 1.0,
        "image_retrieval_mean_rank": 9 / 6,
        "image_retrieval_median_rank": 1.0,  # sorted 1 1 1 1 2 3
        "text_retrieval_recall@1": 0.5,
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_recall@5": 1.0,
        "text_retrieval_mean_rank": 1.5,
        "text_retrieval_median_rank": 1.5,  # sorted 1 1 2 2: mean of the middle two
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
        assert isinstance(metrics[key], float), key


def test_default_keys():
    metrics = retrieval_metrics(*_hand_case())
    for direction in ("image_retrieval", "text_retrieval"):
        for k in (1, 5, 10):
            assert f"{direction}_recall@{k}" in metrics
        assert f"{direction}_mean_rank" in metrics and f"{direction}_median_rank" in metrics
    assert len(metrics) == 10


def test_constant_model_gets_worst_ranks():
    # All scores equal: every wrong candidate ties with the right one and, pessimistically, wins.
    num_images, text_to_image = 5, torch.tensor([0, 0, 0, 1, 2, 3, 4, 4])
    image_features = torch.ones(num_images, 3) / math.sqrt(3)
    text_features = torch.ones(len(text_to_image), 3) / math.sqrt(3)
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image, block_size=2)
    assert image_ranks.tolist() == [num_images] * len(text_to_image)
    captions_per_image = torch.bincount(text_to_image)
    assert text_ranks.tolist() == (1 + len(text_to_image) - captions_per_image).tolist()
    metrics = retrieval_metrics(image_features, text_features, text_to_image, ks=(1,))
    assert metrics["image_retrieval_recall@1"] == 0.0 and metrics["text_retrieval_recall@1"] == 0.0


@pytest.mark.parametrize("block_size", [1, 3, 7, 64, 10_000])
def test_blockwise_matches_definition_with_many_ties(block_size):
    # Small-integer features make every dot product exact and ties frequent, so the tie rule is exercised on
    # every block boundary, not only in the hand case.
    generator = torch.Generator().manual_seed(block_size)
    num_images, dim = 23, 4
    text_to_image = _random_assignment(generator, num_images, num_extra=40)
    image_features = torch.randint(-2, 3, (num_images, dim), generator=generator).float()
    text_features = torch.randint(-2, 3, (len(text_to_image), dim), generator=generator).float()
    scores = (text_features.double() @ image_features.double().T).numpy()
    expected_image, expected_text = _reference_ranks_by_definition(scores, text_to_image.numpy())
    image_ranks, text_ranks = retrieval_ranks(image_features, text_features, text_to_image, block_size=block_size)
    assert image_ranks.tolist() == expected_image
    assert text_ranks.tolist() == expected_text


@pytest.mark.parametrize("block_size", [1, 5, 32, 500])
def test_blockwise_metrics_match_sorting_reference(block_size):
    generator = torch.Generator().manual_seed(1234)
    num_images, dim = 61, 16
    text_to_image = _random_assignment(generator, num_images, num_extra=150)
    image_features = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=-1)
    # Captions near their image, so recall is far from both 0 and 1 and the comparison means something.
    noise = torch.randn(len(text_to_image), dim, generator=generator)
    text_features = torch.nn.functional.normalize(image_features[text_to_image] + 0.9 * noise, dim=-1)
    scores = (text_features.double() @ image_features.double().T).numpy()
    image_ranks, text_ranks = _reference_ranks_by_sorting(scores, text_to_image.numpy())

    metrics = retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 5, 10), block_size=block_size)
    for prefix, ranks in (("image_retrieval_", image_ranks), ("text_retrieval_", text_ranks)):
        for k in (1, 5, 10):
            assert metrics[f"{prefix}recall@{k}"] == pytest.approx(np.mean(ranks <= k)), (prefix, k)
        assert metrics[f"{prefix}mean_rank"] == pytest.approx(np.mean(ranks))
        assert metrics[f"{prefix}median_rank"] == pytest.approx(np.median(ranks))
    assert 0.1 < metrics["image_retrieval_recall@1"] < 0.9  # the data is neither trivial nor hopeless


def test_low_precision_inputs_are_scored_in_float32():
    image_features, text_features, text_to_image = _hand_case(torch.bfloat16)
    reference = retrieval_metrics(image_features.float(), text_features.float(), text_to_image)
    assert retrieval_metrics(image_features, text_features, text_to_image) == reference


def test_no_intermediate_as_large_as_the_full_score_matrix():
    # Records the size of every tensor the kernels produce (views of the inputs included, hence D is kept small
    # so that the inputs stay below the bound): the blockwise promise is that none exceeds
    # block_size * max(N_img, N_txt), far below N_img * N_txt here.
    dispatch = pytest.importorskip("torch.utils._python_dispatch")

    class LargestOutput(dispatch.TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, tensor.numel())
            return out

    generator = torch.Generator().manual_seed(0)
    num_images, block_size = 50, 4
    text_to_image = _random_assignment(generator, num_images, num_extra=70)
    image_features = torch.randn(num_images, 3, generator=generator)  # 3 * N_txt < block_size * N_txt
    text_features = torch.randn(len(text_to_image), 3, generator=generator)
    with LargestOutput():
        retrieval_metrics(image_features, text_features, text_to_image, block_size=block_size)
    assert 0 < LargestOutput.largest <= block_size * max(num_images, len(text_to_image))
    assert LargestOutput.largest < num_images * len(text_to_image) // 4


def test_rank_helpers():
    ranks = torch.tensor([1, 3, 2, 10])
    assert rank_to_recall(ranks, [1, 2, 5]) == {1: 0.25, 2: 0.5, 5: 0.75}
    summary = rank_summary(ranks, [1], prefix="x_")
    assert summary == {"x_recall@1": 0.25, "x_mean_rank": 4.0, "x_median_rank": 2.5}
    with pytest.raises(ValueError, match="empty"):
        rank_to_recall(torch.tensor([], dtype=torch.long), [1])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i, t, m: (i, t, torch.tensor([0, 0, 1, 2, 2, 2])), "at least one caption"),
        (lambda i, t, m: (i, t, torch.tensor([0, 0, 1, 2, 3, 4])), r"in \[0, 3\]"),
        (lambda i, t, m: (i, t, torch.tensor([0, 0, 1, 2, 3])), r"shape \(N_txt,\) = \(6,\)"),
        (lambda i, t, m: (i, t, m.float()), "integer"),
        (lambda i, t, m: (i, t[:, :3], m), "embedding size"),
        (lambda i, t, m: (i[0], t, m), "2-D"),
        (lambda i, t, m: (i, t * float("nan"), m), "finite"),
    ],
)
def test_invalid_inputs_raise_with_explanation(mutate, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(*mutate(*_hand_case()))


@pytest.mark.parametrize(("ks", "block_size"), [((), 8), ((0, 1), 8), ((1,), 0)])
def test_invalid_ks_and_block_size(ks, block_size):
    with pytest.raises(ValueError):
        retrieval_metrics(*_hand_case(), ks=ks, block_size=block_size)
