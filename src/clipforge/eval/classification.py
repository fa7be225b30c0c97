"""Classification metrics from logits, block by block, under a stated tie rule: zero-shot and linear probes share them.

Two tie rules, for a true class ``y`` whose logit equals that of another class ``c``:

- ``pessimistic`` (clipforge's default): every tied wrong class ranks ahead of ``y``. A constant model gets the
  worst possible rank, never a lucky one.
- ``index``: ties go to the lower class index: ``c`` ranks ahead of ``y`` only when ``c < y``. This is
  ``torch.argmax``'s rule (the first maximal index), which CLIP_benchmark's predictions follow; its top-k
  accuracy takes ``torch.topk``, whose order among equal values PyTorch does not promise (it varies with the
  number of classes, k and the device), so on tied logits its acc5 may differ from any fixed rule.

With ties absent (the usual case for real features) both rules give the same numbers.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from clipforge.config.choices import TIE_RULES

TieRule = Literal["pessimistic", "index"]


def check_tie_rule(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"ties={ties!r}: expected one of {list(TIE_RULES)}")


def class_ranks(logits: Tensor, labels: Tensor, ties: TieRule = "pessimistic") -> Tensor:
    """(N,) 1-based rank of each true class among the C logits of its row.

    ``pessimistic``: ``1 + #{c != y : logit_c >= logit_y}``; ``index``: ``1 + #{c : logit_c > logit_y} +
    #{c < y : logit_c == logit_y}``.
    """
    true_logit = logits.gather(1, labels[:, None])  # (N, 1)
    if ties == "pessimistic":
        return (logits >= true_logit).sum(dim=1)  # the true class counts itself: 1 + wrong classes at or above
    before = torch.arange(logits.shape[1], device=logits.device)[None, :] < labels[:, None]  # (N, C): c < y
    return 1 + (logits > true_logit).sum(dim=1) + ((logits == true_logit) & before).sum(dim=1)


def top1_predictions(logits: Tensor, labels: Tensor, ties: TieRule = "pessimistic") -> Tensor:
    """(N,) the class each row predicts, under ``ties``: ``index`` is ``argmax`` (the first maximal class);
    ``pessimistic`` predicts a wrong class whenever one ties with the true class at the top (the lowest-index
    such class), so the share of correct predictions equals top-1 accuracy under the same rule."""
    if ties == "index":
        return logits.argmax(dim=1)
    is_top = logits >= logits.max(dim=1, keepdim=True).values
    wrong_top = is_top.scatter(1, labels[:, None], False)
    return torch.where(wrong_top.any(dim=1), wrong_top.to(torch.uint8).argmax(dim=1), labels)


class ClassificationTally:
    """Top-k hits and the confusion matrix, accumulated over blocks of logits (no N x C matrix is kept).

    ``add(logits, labels)`` takes one block: (B, C) logits and (B,) true classes. :meth:`metrics` gives
    ``acc{k}`` for each k in ``ks`` with ``k <= C`` (the share of rows whose true class ranks <= k under the tie
    rule), ``mean_per_class_recall`` (top-1 recall of each class averaged over the classes present in the labels:
    scikit-learn's ``balanced_accuracy_score``, which CLIP_benchmark reports) and ``confusion_matrix`` (C x C
    nested ints, row = true class, column = top-1 prediction under the tie rule, so its trace over N is acc1).
    """

    def __init__(self, num_classes: int, ks: Sequence[int] = (1, 5), ties: TieRule = "pessimistic") -> None:
        check_ks(ks)
        check_tie_rule(ties)
        self.num_classes = num_classes
        self.ks = tuple(int(k) for k in ks)
        self.ties = ties
        self.count = 0
        self.hits = {k: 0 for k in self.ks}
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)

    def add(self, logits: Tensor, labels: Tensor) -> None:
        logits = logits.float()
        labels = labels.to(device=logits.device, dtype=torch.long)
        ranks = class_ranks(logits, labels, self.ties)
        for k in self.ks:
            self.hits[k] += int((ranks <= k).sum())
        predictions = top1_predictions(logits, labels, self.ties)
        self.confusion += torch.bincount((labels * self.num_classes + predictions).cpu(), minlength=self.num_classes**2)
        self.count += len(labels)

    def metrics(self) -> dict[str, float | list[list[int]]]:
        if self.count == 0:
            raise ValueError("no rows were added: classification metrics need at least one example")
        metrics: dict[str, float | list[list[int]]] = {
            f"acc{k}": self.hits[k] / self.count for k in self.ks if k <= self.num_classes
        }
        confusion = self.confusion.reshape(self.num_classes, self.num_classes)
        support = confusion.sum(dim=1)
        present = support > 0
        metrics["mean_per_class_recall"] = (confusion.diagonal()[present].double() / support[present]).mean().item()
        metrics["confusion_matrix"] = confusion.tolist()
        return metrics


def check_ks(ks: Sequence[int]) -> None:
    # numbers.Integral admits NumPy integers; bool is excluded because top-True accuracy is surely a mistake
    if len(ks) == 0 or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {list(ks)!r}")
