"""Zero-shot classification and retrieval of a model on one data source (results and their JSON: ``results.py``;
linear probes: ``probe.py``).

The glue between a source (``clipforge.data.sources``), a model and the metric maths (``zeroshot.py``,
``retrieval.py``): images are embedded with the evaluation transform (``features.py``: resize + center crop),
texts and images in batches under ``torch.inference_mode`` and the caller's autocast. Images that fail to
decode are left out of every metric and counted (with their captions, for retrieval), never fatal.

The model is used as it is: put it in eval mode first (``load_checkpoint`` already does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clipforge.config import DataConfig
from clipforge.data.base import DataError, ImageTextSource, capabilities_of
from clipforge.data.files import classnames_for
from clipforge.data.processor import Processor
from clipforge.data.shard_index import IndexedShards
from clipforge.data.sources import build_source
from clipforge.eval.classification import TieRule
from clipforge.eval.features import LockedTowerMemo, encode_source_images, encode_texts
from clipforge.eval.results import EvalResult, RetrievalEmbeddings
from clipforge.eval.retrieval import retrieval_metrics
from clipforge.eval.templates import get_templates, load_classnames, split_dataset_suffix
from clipforge.eval.zeroshot import build_zeroshot_classifier, zeroshot_metrics
from clipforge.model import CLIPModel
from clipforge.viz import plot_retrieval_grid

__all__ = [
    "EvalResult",
    "RetrievalEmbeddings",
    "classification_targets",
    "classnames_from_file",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "open_eval_source",
    "plot_retrieval_examples",
    "source_templates",
    "zeroshot_classifier",
]

ZEROSHOT_KS = (1, 5)  # CLIP_benchmark reports acc1 and acc5
RETRIEVAL_KS = (1, 5, 10)

Autocast = contextlib.AbstractContextManager | None


def open_eval_source(data: DataConfig) -> ImageTextSource:
    """``build_source(data)`` as a finite source evaluation can index: every image visited exactly once, its
    captions and label looked up by index.

    A map-style source is used as it is; WebDataset shards (a stream: no ``len``, no ``load_image``) are indexed
    by one scan of their headers (:class:`~clipforge.data.shard_index.IndexedShards`), their samples then read
    in file order. A source whose ``capabilities`` say it cannot be evaluated is refused with a ``DataError``
    that says so, rather than failing mid-run.
    """
    source = build_source(data)
    capabilities = capabilities_of(source)
    if not capabilities.evaluable:
        raise DataError(
            f"data.kind={data.kind!r} gives a source ({type(source).__name__}) that evaluation cannot index; "
            "evaluate on a source with random access (manifest, coco, flickr, imagefolder, idx, cifar, hf) or shards"
        )
    if not capabilities.random_access:
        return IndexedShards(source)
    return source


def source_templates(source: ImageTextSource) -> list[str] | None:
    """The prompt templates that come with the data (CLIP_benchmark's ``zeroshot_classification_templates.txt``
    beside WebDataset shards), or None."""
    templates = getattr(source, "templates", None)
    return list(templates) if templates else None


# ----------------------------------------------------------------------------------------------
# Zero-shot classification
# ----------------------------------------------------------------------------------------------
def classification_targets(
    source: ImageTextSource, classnames: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """The source's labels (num_images,) and the class names to prompt with (``classnames`` if given).

    Raises ``DataError`` saying what is missing: labels (the source is not a classification set), names
    (its labels are plain numbers), or names for the largest label.
    """
    if source.labels is None:
        raise DataError(
            "zero-shot classification needs class labels, and this source has none; use a labelled source "
            "(a manifest with a 'label' column, imagefolder, idx, cifar) or task retrieval"
        )
    names = list(classnames) if classnames is not None else source.classnames
    if not names:
        raise DataError(
            "zero-shot classification puts class names into its prompts, and this source's labels are plain "
            "numbers; give the class names in label order (a .txt file with one name per line, or .json)"
        )
    labels = np.asarray(source.labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(
            f"the labels run from {labels.min()} to {labels.max()} but there are {len(names)} class names; "
            "every label must index a name"
        )
    return labels, [str(name) for name in names]


def classnames_from_file(source: ImageTextSource, spec: str, kind: str) -> list[str]:
    """Class names for ``source``'s labels from ``spec``, read as ``data.classnames`` is (a JSON list in label
    order, a JSON object mapping the source's own class names, or label numbers, to readable names, a text
    file with one name per line, or a shipped list), or ``file.json:dataset``: the entry of CLIP_benchmark's
    ``{dataset: [names]}`` layout (``en_classnames.json``); ``kind`` names the data kind in error messages."""
    if source.labels is None:
        classification_targets(source)  # raises, explaining that the source has no labels
    default = source.classnames or [str(label) for label in range(int(np.max(source.labels, initial=-1)) + 1)]
    path, dataset = split_dataset_suffix(spec)
    if dataset is not None:
        names = load_classnames(path, dataset)
        if len(names) != len(default):
            raise DataError(
                f"{spec}: lists {len(names)} names but the data has {len(default)} classes; expected one name per "
                "class, in label order"
            )
        return names
    return classnames_for(spec, kind, len(default), default)


def zeroshot_classifier(
    model: CLIPModel,
    processor: Processor,
    classnames: Sequence[str],
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
    autocast: Autocast = None,
    memo: LockedTowerMemo | None = None,
) -> torch.Tensor:
    """(C, D) unit-norm class weights: the normalized mean of the normalized prompt embeddings of each class
    (see ``build_zeroshot_classifier``); ``templates`` is any spec ``get_templates`` accepts; ``memo`` keeps a
    locked text tower's outputs across calls (``encode_texts``)."""

    def encode(texts: list[str]) -> torch.Tensor:
        return encode_texts(model, processor, texts, batch_size, autocast, memo)

    return build_zeroshot_classifier(encode, list(classnames), get_templates(templates), batch_size)


@torch.inference_mode()
def evaluate_zeroshot(
    model: CLIPModel,
    processor: Processor,
    source: ImageTextSource,
    classnames: Sequence[str] | None = None,
    templates: str | Sequence[str] = "simple",
    batch_size: int = 256,
    autocast: Autocast = None,
    num_workers: int = 0,
    classifier: torch.Tensor | None = None,
    memo: LockedTowerMemo | None = None,
    ties: TieRule = "pessimistic",
) -> EvalResult:
    """Zero-shot classification of every readable image of ``source`` by its most similar class prompt.

    Prediction: ``argmax_c <image_n, w_c>`` with ``w`` from :func:`zeroshot_classifier`. Metrics (see
    ``zeroshot_metrics``, under the tie rule ``ties``): ``acc1``, ``acc5`` (only with at least 5 classes) and
    ``mean_per_class_recall``; the confusion matrix is kept on the result.

    Args:
        processor: the model's processor: the image transform and the tokenizer with its context length.
        classnames: names in label order; None = the source's own ``classnames``.
        templates: a named set, one template, a list, or a JSON file (``get_templates``).
        classifier: (C, D) weights already built for these classes and templates (the trainer's per-step
            cache); None builds them here.
        memo: keeps locked towers' outputs across calls (evaluation rounds of one run, ``LockedTowerMemo``).
    """
    labels, names = classification_targets(source, classnames)
    if classifier is None:
        classifier = zeroshot_classifier(model, processor, names, templates, batch_size, autocast, memo)
    images = encode_source_images(model, source, processor, batch_size, num_workers, autocast, memo)
    labels_kept = torch.as_tensor(labels[images.indices])
    measured = zeroshot_metrics(images.features, classifier, labels_kept, ZEROSHOT_KS, ties=ties)
    confusion = measured.pop("confusion_matrix")
    return EvalResult(
        task="zeroshot",
        metrics={key: float(value) for key, value in measured.items()},
        num_images=len(images.indices),
        skipped_images=len(images.skipped),
        confusion_matrix=confusion,
        classnames=names,
        skipped=images.skipped,
        ties=ties,
    )


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate_retrieval(
    model: CLIPModel,
    processor: Processor,
    source: ImageTextSource,
    batch_size: int = 256,
    autocast: Autocast = None,
    num_workers: int = 0,
    ks: Sequence[int] = RETRIEVAL_KS,
    memo: LockedTowerMemo | None = None,
    ties: TieRule = "pessimistic",
) -> EvalResult:
    """Text -> image and image -> text retrieval over every caption of every readable image of ``source``.

    Every caption is a text query whose one correct image is the image it belongs to; every image is a
    query whose correct texts are all of its captions (a hit when any one of them is in the top k). Metrics
    (see ``retrieval_metrics``, under the tie rule ``ties``): ``{image,text}_retrieval_recall@{k}`` for ``ks`` and
    the mean and median ranks. An unreadable image is dropped together with its captions, so no caption
    points at an image that is not among the candidates.

    Captions shared by several images (``"a dog on the grass"`` under two photos) are embedded once
    (``encode_texts`` encodes each distinct string once), so their scores are bit-identical: such ties are
    resolved by the tie rule, and the metrics do not depend on ``batch_size``. ``memo``: see
    ``evaluate_zeroshot``.
    """
    images = encode_source_images(model, source, processor, batch_size, num_workers, autocast, memo)
    captions: list[str] = []
    text_to_image: list[int] = []
    for row, index in enumerate(images.indices):
        owned = source.captions(int(index))
        captions.extend(owned)
        text_to_image.extend([row] * len(owned))
    unreadable = np.setdiff1d(np.arange(len(source)), images.indices)
    skipped_captions = sum(len(source.captions(int(index))) for index in unreadable)
    text_features = encode_texts(model, processor, captions, batch_size, autocast, memo)  # (N_txt, D)
    owners = torch.as_tensor(text_to_image, dtype=torch.long)
    metrics = retrieval_metrics(images.features, text_features, owners, ks=ks, ties=ties)
    return EvalResult(
        task="retrieval",
        metrics={key: float(value) for key, value in metrics.items()},
        num_images=len(images.indices),
        skipped_images=len(images.skipped),
        num_captions=len(captions),
        skipped_captions=skipped_captions,
        embeddings=RetrievalEmbeddings(images.features, images.indices, text_features, captions, owners),
        skipped=images.skipped,
        ties=ties,
    )


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------
def plot_retrieval_examples(
    result: EvalResult, source: ImageTextSource, path: str | Path, queries: int = 8, top: int = 5
) -> Path:
    """Draw ``queries`` caption queries, evenly spread over the caption list, with their ``top`` images.

    Only the chosen queries are scored (queries x N_img), never the full caption x image matrix.
    """
    found = result.embeddings
    picks = np.unique(np.linspace(0, len(found.captions) - 1, min(queries, len(found.captions))).round().astype(int))
    scores = found.text_features[torch.as_tensor(picks)] @ found.image_features.T  # (queries, N_img)
    best = scores.topk(min(top, scores.shape[1]), dim=1)
    rows, hits = [], []
    for query, image_rows in zip(picks, best.indices.tolist(), strict=True):
        rows.append([source.load_image(int(found.image_indices[row])) for row in image_rows])
        hits.append([row == int(found.text_to_image[query]) for row in image_rows])
    texts = [found.captions[query] for query in picks]
    return plot_retrieval_grid(texts, rows, hits, best.values.tolist(), path, title=f"text -> image: top {top}")
