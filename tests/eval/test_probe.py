"""The linear probe's parts: the fit (scikit-learn's objective, reached in blocks), the search, the draws."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipforge.data.base import DataError
from clipforge.eval.probe import (
    L2_GRID,
    Features,
    choose_l2,
    evaluate_linear_probe,
    fewshot_indices,
    fit_logistic_regression,
    probe_metrics,
    split_validation,
)
from tests.eval.handmade import colour_model, colour_processor


def clusters(count: int, classes: int, noise: float, seed: int, dim: int = 8) -> Features:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(count) % classes
    features = centres[labels] + noise * torch.randn(count, dim, generator=generator)
    return Features(torch.nn.functional.normalize(features, dim=-1), labels)


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_the_fit_reaches_scikit_learns_logistic_regression(l2: float) -> None:
    """The same convex objective: (1/N) sum CE + (l2/2)||W||^2 is scikit-learn's with C = 1 / (l2 N)."""
    from sklearn.linear_model import LogisticRegression

    data = clusters(120, 4, 1.0, seed=0)
    ours = fit_logistic_regression(data, 4, l2, block_size=7)  # blocks of 7 rows: the full-batch gradient still
    theirs = LogisticRegression(C=1 / (l2 * len(data)), tol=1e-10, max_iter=10_000).fit(
        data.features.numpy(), data.labels.numpy()
    )
    assert np.abs(ours.weight.numpy() - theirs.coef_).max() < 5e-3 * max(1.0, np.abs(theirs.coef_).max())
    ours_predicted = torch.cat([logits.argmax(1) for _, logits in ours.logits(data.features, 16)])
    assert (ours_predicted.numpy() == theirs.predict(data.features.numpy())).mean() >= 0.98


def test_the_fit_does_not_depend_on_the_block_size() -> None:
    data = clusters(60, 3, 0.8, seed=1)
    whole = fit_logistic_regression(data, 3, 1e-2)
    blocked = fit_logistic_regression(data, 3, 1e-2, block_size=8)
    assert torch.allclose(whole.weight, blocked.weight, atol=5e-3)  # one optimum, to the solver's tolerance
    metrics = probe_metrics(whole, data, 3, block_size=5)
    assert metrics["acc1"] == probe_metrics(whole, data, 3)["acc1"]


def test_the_search_picks_the_strength_that_validates_best() -> None:
    train, validation = clusters(80, 4, 1.2, seed=2), clusters(80, 4, 1.2, seed=3)
    l2, accuracy = choose_l2(train, validation, 4)
    assert l2 in L2_GRID
    # no coarse grid value validates better than the chosen one
    for candidate in L2_GRID[::16]:
        probe = fit_logistic_regression(train, 4, float(candidate))
        assert probe_metrics(probe, validation, 4)["acc1"] <= accuracy
    assert accuracy > 0.5


def test_shots_and_validation_draws() -> None:
    labels = np.repeat(np.arange(3), 4)
    picked = fewshot_indices(labels, 2, np.random.default_rng(0))
    assert sorted(np.bincount(labels[picked]).tolist()) == [2, 2, 2] and len(set(picked.tolist())) == 6
    assert not np.array_equal(picked, fewshot_indices(labels, 2, np.random.default_rng(1)))
    with pytest.raises(DataError, match=r"--shots 5: classes \[0, 1, 2\] have fewer than 5"):
        fewshot_indices(labels, 5, np.random.default_rng(0))
    kept, held_out = split_validation(10, 0.2, np.random.default_rng(0))
    assert len(held_out) == 2 and sorted([*kept, *held_out]) == list(range(10))
    assert len(split_validation(3, 0.01, np.random.default_rng(0))[1]) == 1  # at least one each
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        split_validation(10, 1.0, np.random.default_rng(0))


class Colours:
    """A labelled map-style source of flat colours: ``hues[label]`` with a little noise."""

    HUES = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (220, 210, 30), (30, 210, 210), (210, 40, 210)]

    def __init__(self, labels: list[int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = np.asarray(labels)
        self.classnames = None
        self.colours = [np.clip(np.array(self.HUES[label]) + rng.uniform(-20, 20, 3), 0, 255) for label in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int):
        from PIL import Image

        return Image.new("RGB", (8, 8), tuple(int(value) for value in self.colours[index]))

    def captions(self, index: int) -> list[str]:
        return [str(self.labels[index])]

    def describe(self, index: int) -> str:
        return f"colour {index}"


def test_a_probe_of_separable_colours_is_perfect_and_writes_clip_benchmarks_keys() -> None:
    train, test = Colours([label % 6 for label in range(60)], 0), Colours([label % 6 for label in range(30)], 1)
    result = evaluate_linear_probe(colour_model(), colour_processor(), train, test, batch_size=16)
    assert result.task == "linear_probe" and result.metrics["lp_acc1"] == 1.0
    assert set(result.metrics) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert result.settings["fewshot_k"] == -1 and result.settings["l2_lambda"] in L2_GRID
    assert result.num_train_images == 60  # refitted on training + validation
    few = evaluate_linear_probe(colour_model(), colour_processor(), train, test, shots=2, seed=3, batch_size=16)
    assert few.task == "fewshot" and few.settings["fewshot_k"] == 2 and few.num_train_images == 12
    assert few.metrics["lp_acc1"] > 0.8


def test_lp_acc5_is_nan_when_no_test_label_reaches_5_as_in_clip_benchmark() -> None:
    train, test = Colours([label % 5 for label in range(40)], 0), Colours([label % 5 for label in range(20)], 1)
    result = evaluate_linear_probe(colour_model(), colour_processor(), train, test, batch_size=16)
    assert math.isnan(result.metrics["lp_acc5"]) and result.metrics["lp_acc1"] == 1.0
