"""Zero-shot classification: a prompt-ensemble classifier built from class names, and its metrics.

Pure tensor functions: the model enters only as an ``encode_text`` callable, the images as features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clipforge.eval.classification import ClassificationTally, TieRule, check_ks
from clipforge.eval.templates import validate_templates

__all__ = ["build_zeroshot_classifier", "zeroshot_metrics", "predict_proba"]


def build_zeroshot_classifier(
    encode_text: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | str,
    batch_size: int = 256,
) -> Tensor:
    """One unit-norm weight vector per class from a prompt ensemble (Radford et al. 2021).

    For class ``c`` with name ``n_c`` and templates ``t_1..t_T``::

        e_{c,t} = encode_text(t.format(n_c)) / ||encode_text(t.format(n_c))||
        w_c     = mean_t e_{c,t} / ||mean_t e_{c,t}||

    Templates hold one ``{}`` placeholder (CLIP_benchmark's ``{c}`` is accepted too and read as ``{}``); a
    template without one raises ``ValueError``. The distinct strings among the ``C * T`` prompts are sent to
    ``encode_text`` once each (in first-appearance order), in batches of at most ``batch_size`` strings, across
    class boundaries, under ``torch.no_grad()``. A prompt that repeats (two classes with the same name, a
    template listed twice) therefore gets one embedding, bit-identical wherever it is used: two classes of the
    same name get the same weights, and the tie rule of :func:`zeroshot_metrics`, not the rounding of a
    batch, decides between them, whatever ``batch_size`` is.

    Args:
        encode_text: maps a list of n strings to an (n, D) tensor of (not necessarily normalized) embeddings.
        classnames: the C class names, in label order.
        templates: a list of templates, or a single template string.
        batch_size: most prompts per ``encode_text`` call.

    Returns:
        (C, D) float32 tensor on the device ``encode_text`` returns, row c for class c.
    """
    templates = validate_templates([templates] if isinstance(templates, str) else templates)
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"classnames must be a non-empty sequence of strings, got {classnames!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    num_templates = len(templates)
    # Class-major order: prompt p belongs to class p // T, so a batch can span several classes and every call
    # to the (slow) text tower is full.
    prompts = [template.format(name) for name in classnames for template in templates]
    unique_prompts, prompt_ids, order, sorted_ids = _distinct_prompts(prompts)
    # Running per-class sums instead of keeping all C*T embeddings: 1000 classes x 80 templates x 1024 floats
    # would otherwise be 320 MB for nothing.
    class_sums: Tensor | None = None
    with torch.no_grad():
        for start in range(0, len(unique_prompts), batch_size):
            batch = unique_prompts[start : start + batch_size]
            embeddings = encode_text(batch)
            if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != len(batch):
                shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
                raise ValueError(f"encode_text must return an (n, D) tensor for n={len(batch)} prompts, got {shape}")
            embeddings = F.normalize(embeddings.float(), dim=-1)
            if class_sums is None:
                class_sums = embeddings.new_zeros(len(classnames), embeddings.shape[1])
            low, high = torch.searchsorted(sorted_ids, torch.tensor([start, start + len(batch)])).tolist()
            uses = order[low:high]  # positions in `prompts` of every use of this batch's prompts
            class_of_use = (uses // num_templates).to(embeddings.device)
            class_sums.index_add_(0, class_of_use, embeddings[(prompt_ids[uses] - start).to(embeddings.device)])
    assert class_sums is not None  # at least one class and one template, checked above
    # Dividing by T would not change the direction; it is kept so the code reads as the mean in the docstring.
    return F.normalize(class_sums / num_templates, dim=-1)


def _distinct_prompts(prompts: Sequence[str]) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """``(unique, ids, order, sorted_ids)``: the distinct prompts in first-appearance order, the (n,) index of
    each prompt among them, and the prompt positions sorted by that index (stable) with the sorted indices, so
    that the uses of distinct prompts ``[start, stop)`` are one contiguous slice of ``order``."""
    distinct: dict[str, int] = {}
    ids = torch.tensor([distinct.setdefault(prompt, len(distinct)) for prompt in prompts])  # (n,)
    order = torch.argsort(ids, stable=True)
    return list(distinct), ids, order, ids[order]


def zeroshot_metrics(
    image_features: Tensor,
    classifier: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    ties: TieRule = "pessimistic",
    block_size: int = 8192,
) -> dict[str, float | list[list[int]]]:
    """Top-k accuracy, mean per-class recall and the confusion matrix of a zero-shot classifier.

    Logits are ``image_features @ classifier.T`` in float32, ``block_size`` images at a time (never the whole
    N x C matrix). For image ``n`` with true class ``y``, its rank under the default tie rule is::

        rank(n) = 1 + #{ c != y : logit(n, c) >= logit(n, y) }

    Tie rule (``ties``, see :mod:`clipforge.eval.classification`): ``pessimistic`` ranks a wrong class with the
    same logit as the true class ahead of it; ``index`` ranks the lower class index first. The image is correct
    at k when ``rank(n) <= k``.

    Returned keys:
        ``acc{k}``: fraction correct at k, only for the k in ``ks`` with k <= C (with fewer than k classes,
            top-k accuracy would be trivially 1, so the key is left out).
        ``mean_per_class_recall``: the top-1 recall of each class, averaged over the classes that have at
            least one image in ``labels`` (classes absent from the set are skipped, not counted as 0).
        ``confusion_matrix``: C x C nested list of ints, row = true class, column = top-1 prediction. The
            prediction follows the same tie rule (pessimistic: if the true class ties for the top logit with
            another class, the lowest-index wrong class is predicted), so the trace divided by N equals ``acc1``.

    Args:
        image_features: (N, D) image embeddings (normally L2-normalized).
        classifier: (C, D) class weights, e.g. from :func:`build_zeroshot_classifier`.
        labels: (N,) integer true classes in [0, C).
        ks: the k for top-k accuracy.
        ties: ``pessimistic`` or ``index``.
        block_size: images scored at once.
    """
    labels = _checked_labels(image_features, classifier, labels, ks)
    weights = classifier.to(image_features.device).float()
    tally = ClassificationTally(classifier.shape[0], ks, ties)
    for start in range(0, len(labels), block_size):
        block = image_features[start : start + block_size].float() @ weights.T  # (block, C)
        tally.add(block, labels[start : start + block_size])
    return tally.metrics()


def _checked_labels(image_features: Tensor, classifier: Tensor, labels: Tensor, ks: Sequence[int]) -> Tensor:
    """``labels`` as long indices on the features' device, after checking every input's shape and type."""
    if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[1]:
        raise ValueError(
            "expected image_features (N, D) and classifier (C, D) with the same D, got "
            f"{tuple(image_features.shape)} and {tuple(classifier.shape)}"
        )
    num_images, num_classes = image_features.shape[0], classifier.shape[0]
    if num_images == 0 or num_classes == 0:
        raise ValueError(f"need at least one image and one class, got N={num_images}, C={num_classes}")
    if labels.shape != (num_images,):
        raise ValueError(f"labels must have shape (N,) = ({num_images},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    check_ks(ks)
    labels = labels.to(device=image_features.device, dtype=torch.long)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}], got values in [{low}, {high}]")
    return labels


def predict_proba(image_features: Tensor, classifier: Tensor, logit_scale: float) -> Tensor:
    """Class probabilities ``softmax(logit_scale * image_features @ classifier.T)`` over the C classes.

    ``logit_scale`` is the multiplier t itself (about 100 for trained CLIP models: ``model.log_logit_scale.exp()``,
    as the losses take it), not its logarithm. Returns an (N, C) float32 tensor whose rows sum to 1.
    """
    if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[1]:
        raise ValueError(
            "expected image_features (N, D) and classifier (C, D) with the same D, got "
            f"{tuple(image_features.shape)} and {tuple(classifier.shape)}"
        )
    logits = float(logit_scale) * (image_features.float() @ classifier.to(image_features.device).float().T)
    return logits.softmax(dim=-1)
