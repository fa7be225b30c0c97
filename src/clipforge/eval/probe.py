"""Linear probes on frozen image features: L2-regularised logistic regression, its strength chosen on validation data.

The protocol of the CLIP paper (Radford et al. 2021, appendix A.3) and CLIP_benchmark: embed the training,
validation and test images with the frozen image tower (``encode_source_images``: the one evaluation feature
path, unit-norm embeddings), fit a multinomial logistic regression on the training features for each candidate
regularisation strength, keep the strength with the best validation top-1 accuracy, refit on training +
validation (a few-shot probe: on its K images per class only) and report test accuracy.

The solver is torch's L-BFGS (full batch, strong-Wolfe line search), not scikit-learn's: the objective is the
same convex one scikit-learn's ``LogisticRegression(solver="lbfgs")`` minimises, but here the loss and its
gradient are summed over blocks of ``block_size`` rows, so no N x C logit matrix is ever built (1.28M ImageNet
training images x 1000 classes would be 5 GB in float32, 10 GB in scikit-learn's float64 copy), the float32
features are used in place, the fit runs on the model's device (a GPU when there is one), and no extra
dependency is needed. The objective, for features x_n, labels y_n, weights W (C x D) and bias b::

    L(W, b) = (1/N) sum_n CE(W x_n + b, y_n) + (lambda / 2) ||W||_F^2

(scikit-learn's ``C`` is ``1 / (lambda N)``; the bias is not penalised). ``lambda`` is searched over
``L2_GRID``, 97 log-spaced values from 1e-6 to 1e2 (CLIP_benchmark's grid), as CLIP_benchmark and the CLIP paper
search: the 7 values 1e-6, 1e-4/3 ... first, then a bisection around the best with steps of 8, 4, 2 and 1 grid
points; ties in validation accuracy keep the earlier (smaller) value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.data.base import DataError, ImageTextSource
from clipforge.data.processor import Processor
from clipforge.eval.classification import ClassificationTally, TieRule, check_tie_rule
from clipforge.eval.features import encode_source_images
from clipforge.eval.results import EvalResult
from clipforge.model import CLIPModel

L2_GRID = np.logspace(-6, 2, num=97)
_COARSE_STEP = 16  # every 16th grid point: 1e-6, 1e-6 * 10**(8/6), ... 1e2 (7 values)
_BISECTION_SPANS = (8, 4, 2, 1)
DEFAULT_BLOCK = 65536  # rows per block of logits: 65,536 x 1000 classes = 256 MB of float32
DEFAULT_VAL_PROPORTION = 0.2


@dataclass
class LinearProbe:
    """A fitted probe: logits = ``features @ weight.T + bias``; ``weight`` (C, D), ``bias`` (C,)."""

    weight: Tensor
    bias: Tensor
    l2: float

    def logits(self, features: Tensor, block_size: int = DEFAULT_BLOCK) -> Iterator[tuple[int, Tensor]]:
        """``(start, logits of rows start .. start + block_size)`` over ``features``, block by block."""
        for start in range(0, len(features), block_size):
            yield start, features[start : start + block_size].float() @ self.weight.T + self.bias


@dataclass
class Features:
    """Unit-norm image embeddings (N, D) and their class labels (N,), on one device."""

    features: Tensor
    labels: Tensor

    def take(self, indices: np.ndarray) -> Features:
        rows = torch.as_tensor(indices, dtype=torch.long, device=self.features.device)
        return Features(self.features[rows], self.labels[rows])

    def __len__(self) -> int:
        return len(self.labels)


def fit_logistic_regression(
    data: Features, num_classes: int, l2: float, max_iter: int = 1000, block_size: int = DEFAULT_BLOCK
) -> LinearProbe:
    """Minimise the module docstring's ``L(W, b)`` with L-BFGS from W = 0, b = 0 (deterministic for given inputs).

    Each objective evaluation sums the cross-entropy and backpropagates block by block (``block_size`` rows of
    logits at a time), so the gradient is the full-batch one while memory stays O(block_size x C).
    """
    with torch.inference_mode(False):  # features embedded under inference mode cannot take part in a backward pass
        features, labels = data.features.float().clone(), data.labels.clone()
    with torch.inference_mode(False):
        weight = torch.zeros(num_classes, features.shape[1], device=features.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=features.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    count = len(labels)

    def objective() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=features.device)
        for start in range(0, count, block_size):
            logits = features[start : start + block_size] @ weight.T + bias  # (block, C)
            part = F.cross_entropy(logits, labels[start : start + block_size], reduction="sum") / count
            part.backward()
            total += part.detach()
        penalty = 0.5 * l2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.inference_mode(False), torch.enable_grad():  # the probe's own parameters need gradients
        optimizer.step(objective)
    return LinearProbe(weight.detach(), bias.detach(), float(l2))


def probe_metrics(
    probe: LinearProbe, data: Features, num_classes: int, ties: TieRule = "pessimistic", block_size: int = DEFAULT_BLOCK
) -> dict[str, float | list[list[int]]]:
    """Top-1/5 accuracy, mean per-class recall and the confusion matrix of ``probe`` on ``data``, in blocks."""
    tally = ClassificationTally(num_classes, (1, 5), ties)
    for start, logits in probe.logits(data.features, block_size):
        tally.add(logits, data.labels[start : start + len(logits)])
    return tally.metrics()


def choose_l2(
    train: Features, validation: Features, num_classes: int, ties: TieRule = "pessimistic", max_iter: int = 1000
) -> tuple[float, float]:
    """(lambda, its validation top-1 accuracy): the coarse-then-bisection search of the module docstring."""
    accuracies: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in accuracies:
            probe = fit_logistic_regression(train, num_classes, float(L2_GRID[index]), max_iter)
            accuracies[index] = float(probe_metrics(probe, validation, num_classes, ties)["acc1"])
        return accuracies[index]

    def best_of(indices: list[int]) -> int:
        best = indices[0]
        for index in indices[1:]:
            if accuracy(index) > accuracy(best):  # strictly better: a tie keeps the earlier candidate
                best = index
        return best

    peak = best_of(list(range(0, len(L2_GRID), _COARSE_STEP)))
    for span in _BISECTION_SPANS:
        peak = best_of([max(peak - span, 0), peak, min(peak + span, len(L2_GRID) - 1)])
    return float(L2_GRID[peak]), accuracy(peak)


def fewshot_indices(
    labels: np.ndarray, shots: int, generator: np.random.Generator, classes: Sequence[int] = ()
) -> np.ndarray:
    """``shots`` images of every class present in ``labels`` or listed in ``classes`` (those the test set holds),
    drawn at random (a permutation, then the first ``shots`` of each class, as CLIP_benchmark draws them);
    ``DataError`` naming the classes that have fewer: a class without training images could never be predicted."""
    order = generator.permutation(len(labels))
    taken: dict[int, list[int]] = {int(label): [] for label in classes}
    for index in order:
        picked = taken.setdefault(int(labels[index]), [])
        if len(picked) < shots:
            picked.append(int(index))
    short = sorted(label for label, picked in taken.items() if len(picked) < shots)
    if short:
        raise DataError(
            f"--shots {shots}: classes {short[:10]} have fewer than {shots} training images (after the validation "
            "images are held out); lower --shots, give --val-data, or give more training data"
        )
    return np.sort(np.concatenate([np.asarray(picked) for picked in taken.values()]))


def split_validation(count: int, proportion: float, generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): a random ``proportion`` of ``count`` rows held out, at least one each."""
    if not 0 < proportion < 1:
        raise ValueError(f"the validation proportion must lie in (0, 1), got {proportion}")
    held_out = min(max(1, round(proportion * count)), count - 1)
    order = generator.permutation(count)
    return np.sort(order[held_out:]), np.sort(order[:held_out])


def _labelled_features(
    model: CLIPModel, source: ImageTextSource, processor: Processor, role: str, encode_options: dict
) -> tuple[Features, int, list]:
    """The readable images' embeddings and labels of ``source``; ``role`` names it in errors."""
    if source.labels is None:
        raise DataError(
            f"a linear probe needs class labels, and the {role} source has none; use a labelled source (a manifest "
            "with a label column, imagefolder, idx, cifar, torchvision, labelled shards)"
        )
    images = encode_source_images(model, source, processor, **encode_options)
    labels = torch.as_tensor(np.asarray(source.labels, dtype=np.int64)[images.indices], device=images.features.device)
    return Features(images.features.float(), labels), len(images.skipped), images.skipped


def evaluate_linear_probe(
    model: CLIPModel,
    processor: Processor,
    train_source: ImageTextSource,
    test_source: ImageTextSource,
    validation_source: ImageTextSource | None = None,
    shots: int | None = None,
    val_proportion: float = DEFAULT_VAL_PROPORTION,
    seed: int = 0,
    batch_size: int = 256,
    autocast: contextlib.AbstractContextManager | None = None,
    num_workers: int = 0,
    ties: TieRule = "pessimistic",
    max_iter: int = 1000,
) -> EvalResult:
    """A linear probe (``shots`` None) or a K-shot probe of ``model``'s frozen image features (module docstring).

    Validation data: ``validation_source``, else a random ``val_proportion`` of the training images (seeded by
    ``seed``, as is the choice of the K shots). Metrics (CLIP_benchmark's names): ``lp_acc1``, ``lp_acc5`` (NaN
    when no test label is 5 or more, CLIP_benchmark's rule), ``lp_mean_per_class_recall``; settings written beside
    them: ``fewshot_k`` (-1 for a full probe), ``seed``, ``l2_lambda`` (the chosen strength), ``normalized``.
    """
    check_tie_rule(ties)
    if shots is not None and shots < 1:
        raise ValueError(f"shots={shots} must be a positive number of images per class")
    options = {"batch_size": batch_size, "num_workers": num_workers, "autocast": autocast}
    train, _, _ = _labelled_features(model, train_source, processor, "training", options)
    test, skipped, skipped_samples = _labelled_features(model, test_source, processor, "test", options)
    generator = np.random.default_rng(seed)
    if validation_source is not None:
        validation, _, _ = _labelled_features(model, validation_source, processor, "validation", options)
    else:
        kept, held_out = split_validation(len(train), val_proportion, generator)
        train, validation = train.take(kept), train.take(held_out)
    names = test_source.classnames or train_source.classnames
    num_classes = max(len(names or []), *(int(part.labels.max()) + 1 for part in (train, validation, test)))
    fitted_on = train
    if shots is not None:
        needed = torch.unique(test.labels).tolist()
        fitted_on = train.take(fewshot_indices(train.labels.cpu().numpy(), shots, generator, needed))
    l2, _ = choose_l2(fitted_on, validation, num_classes, ties, max_iter)
    if shots is None:  # a full probe refits on training + validation; a few-shot one keeps to its K per class
        fitted_on = Features(
            torch.cat([fitted_on.features, validation.features]), torch.cat([fitted_on.labels, validation.labels])
        )
    probe = fit_logistic_regression(fitted_on, num_classes, l2, max_iter)
    measured = probe_metrics(probe, test, num_classes, ties)
    confusion = measured.pop("confusion_matrix")
    acc5 = float(measured["acc5"]) if "acc5" in measured and int(test.labels.max()) >= 5 else float("nan")
    return EvalResult(
        task="linear_probe" if shots is None else "fewshot",
        metrics={
            "lp_acc1": float(measured["acc1"]),
            "lp_acc5": acc5,
            "lp_mean_per_class_recall": float(measured["mean_per_class_recall"]),
        },
        num_images=len(test),
        skipped_images=skipped,
        confusion_matrix=confusion,
        classnames=list(names) if names else [str(label) for label in range(num_classes)],
        skipped=skipped_samples,
        settings={"fewshot_k": -1 if shots is None else shots, "seed": seed, "l2_lambda": l2, "normalized": True},
        ties=ties,
        num_train_images=len(fitted_on),
    )
