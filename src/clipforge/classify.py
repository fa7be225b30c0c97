"""``clipforge classify``: zero-shot class probabilities of image files over labels given on the command line.

Each label becomes a prompt ensemble (``clipforge.eval.zeroshot.build_zeroshot_classifier``: the normalized
mean of the normalized embeddings of every template filled with the label), and

    p(label c | image n) = softmax_c(t * <image_n, w_c>),   t = exp(log_logit_scale), the model's multiplier.

(A SigLIP model is read the same way: the softmax over the given labels, not its per-pair sigmoid.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipforge.config.choices import DEFAULT_TEMPLATES
from clipforge.data.inputs import ImageFilesSource
from clipforge.eval.features import encode_source_images
from clipforge.eval.runner import zeroshot_classifier
from clipforge.eval.zeroshot import predict_proba
from clipforge.model.factory import LoadedModel


@dataclass
class Classification:
    """Probabilities (N, C) of the N images that decoded (``paths``), over ``labels``; failures listed apart."""

    paths: list[str]
    labels: list[str]
    probabilities: np.ndarray
    failed: list[dict[str, str]] = field(default_factory=list)

    def format(self, top: int = 5) -> str:
        """The table ``clipforge classify`` prints: each image, then its ``top`` labels with probabilities."""
        lines = []
        for path, values in zip(self.paths, self.probabilities, strict=True):
            order = np.argsort(-values, kind="stable")[:top]
            lines.append(path)
            lines.extend(f"  {values[c]:6.1%}  {self.labels[c]}" for c in order)
        lines.extend(f"failed: {failure['reason']}" for failure in self.failed)
        return "\n".join(lines)


def parse_labels(text: str | Sequence[str]) -> list[str]:
    """``"cat, dog,car"`` (or a list of such strings) -> ``["cat", "dog", "car"]``; at least two distinct labels."""
    parts = [text] if isinstance(text, str) else list(text)
    labels = list(dict.fromkeys(label.strip() for part in parts for label in part.split(",") if label.strip()))
    if len(labels) < 2:
        raise ValueError(f"--labels {text!r}: give at least two comma-separated labels, e.g. 'cat,dog,car'")
    return labels


def expand_image_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Image files as given, folders replaced by the image files below them (recursively, sorted)."""
    expanded: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            source = ImageFilesSource.from_folder(path)
            expanded.extend(source.describe(i) for i in range(len(source)))
        else:
            expanded.append(str(path))
    if not expanded:
        raise ValueError("no images given")
    return expanded


def classify_images(
    loaded: LoadedModel,
    images: Sequence[str | os.PathLike],
    labels: Sequence[str],
    templates: str | Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
) -> Classification:
    """Zero-shot probabilities of ``images`` (files or folders) over ``labels`` with the ``templates`` ensemble
    (any spec ``get_templates`` accepts: a named set, one template with ``{}``, a list, a JSON file)."""
    source = ImageFilesSource(expand_image_paths(images))
    classifier = zeroshot_classifier(loaded.model, loaded.processor, list(labels), templates)
    features = encode_source_images(loaded.model, source, loaded.processor, batch_size=batch_size)
    logit_scale = float(loaded.model.log_logit_scale.detach().exp())  # t, what predict_proba takes
    probabilities = predict_proba(features.features, classifier, logit_scale).cpu().numpy()
    paths = [source.describe(int(i)) for i in features.indices]
    failed = [{"id": s.where, "reason": s.reason} for s in features.skipped]
    return Classification(paths, list(labels), probabilities, failed)
