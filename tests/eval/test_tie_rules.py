"""Both tie rules against plain references: ranks read off a stable sort, on scores with many exact ties."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.eval.classification import ClassificationTally, class_ranks, top1_predictions
from clipforge.eval.retrieval import retrieval_ranks


def reference_rank(scores: list[float], correct: set[int], ties: str) -> int:
    """1-based rank of the best-ranked correct candidate: candidates ordered by score (high first), ties by index
    (``index``) or with every wrong candidate first (``pessimistic``)."""
    if ties == "index":
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
    else:
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c in correct, c))
    return 1 + next(position for position, c in enumerate(order) if c in correct)


@st.composite
def tied_retrieval(draw):
    """Integer-valued features (exact products, many ties), every image with 1-3 captions."""
    num_images = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, 3), min_size=num_images, max_size=num_images))
    owners = [image for image, count in enumerate(counts) for _ in range(count)]
    dim = draw(st.integers(1, 3))
    values = st.integers(-2, 2)
    images = draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=num_images, max_size=num_images))
    texts = draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=len(owners), max_size=len(owners)))
    return torch.tensor(images, dtype=torch.float32), torch.tensor(texts, dtype=torch.float32), torch.tensor(owners)


@settings(max_examples=150, deadline=None)
@given(data=tied_retrieval(), ties=st.sampled_from(["pessimistic", "index"]), block=st.integers(1, 4))
def test_retrieval_ranks_follow_the_tie_rule_in_any_block_size(data, ties: str, block: int) -> None:
    images, texts, owners = data
    image_ranks, text_ranks = retrieval_ranks(images, texts, owners, block_size=block, ties=ties)
    scores = (texts @ images.T).tolist()  # (N_txt, N_img), exact: small integers
    for text, row in enumerate(scores):
        assert image_ranks[text] == reference_rank(row, {int(owners[text])}, ties)
    for image in range(len(images)):
        row = [scores[text][image] for text in range(len(texts))]
        own = {text for text in range(len(texts)) if owners[text] == image}
        assert text_ranks[image] == reference_rank(row, own, ties)


@settings(max_examples=150, deadline=None)
@given(
    logits=st.integers(1, 6).flatmap(
        lambda classes: st.lists(
            st.lists(st.integers(0, 2), min_size=classes, max_size=classes), min_size=1, max_size=8
        )
    ),
    data=st.data(),
    ties=st.sampled_from(["pessimistic", "index"]),
)
def test_class_ranks_and_predictions_follow_the_tie_rule(logits, data, ties: str) -> None:
    classes = len(logits[0])
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=len(logits), max_size=len(logits)))
    scores, truth = torch.tensor(logits, dtype=torch.float32), torch.tensor(labels)
    ranks = class_ranks(scores, truth, ties)
    predictions = top1_predictions(scores, truth, ties)
    for row, label in enumerate(labels):
        assert ranks[row] == reference_rank(logits[row], {label}, ties)
        assert (predictions[row] == label) == (ranks[row] == 1)  # a prediction is right exactly at rank 1
        assert logits[row][predictions[row]] == max(logits[row])
    if ties == "index":  # argmax: CLIP_benchmark's prediction
        assert torch.equal(predictions, scores.argmax(dim=1))
    tally = ClassificationTally(classes, (1,), ties)
    for start in range(0, len(labels), 3):  # in blocks: the same counts as all at once
        tally.add(scores[start : start + 3], truth[start : start + 3])
    assert tally.metrics()["acc1"] == (ranks == 1).double().mean().item()


def test_a_constant_model_is_last_under_pessimistic_and_first_for_the_first_index_under_index() -> None:
    images, texts = torch.ones(4, 2), torch.ones(4, 2)
    owners = torch.arange(4)
    pessimistic, _ = retrieval_ranks(images, texts, owners, ties="pessimistic")
    index, _ = retrieval_ranks(images, texts, owners, ties="index")
    assert pessimistic.tolist() == [4, 4, 4, 4] and index.tolist() == [1, 2, 3, 4]
