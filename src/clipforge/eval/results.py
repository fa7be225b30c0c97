"""What an evaluation measured, and how it is written: CLIP_benchmark's results JSON, its file names, a table.

The JSON is CLIP_benchmark's own layout, so its tooling reads clipforge's results unchanged (``clip_benchmark
build`` turns a folder of them into one CSV)::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "metrics": {...}, "language": "en"}

``model`` names the architecture (:func:`model_label`) and ``pretrained`` the weights (the checkpoint or weights
spec as given), as CLIP_benchmark's ``--model`` / ``--pretrained`` do; its tables join them as the model's full
name. Where CLIP_benchmark writes NaN, so does clipforge: ``acc5`` with fewer than 5 classes (zero-shot) and
``lp_acc5`` when no test label reaches 5 (its linear-probe rule); JSON spells it ``NaN``, as Python's json writes
and reads it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipforge.data.samples import SkippedSample
from clipforge.io import atomic_write_text

if TYPE_CHECKING:
    import torch

    from clipforge.config import DataConfig, ModelConfig

# our task names -> the CLIP_benchmark task names used in the results JSON (a few-shot probe is its linear_probe
# with fewshot_k = K)
BENCHMARK_TASKS = {
    "zeroshot": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
    "linear_probe": "linear_probe",
    "fewshot": "linear_probe",
}
DEFAULT_LANGUAGE = "en"


@dataclass
class RetrievalEmbeddings:
    """The embeddings behind a retrieval result, for pictures of its top results.

    ``image_features`` (N_img, D) and ``text_features`` (N_txt, D) are unit-norm; image row ``r`` is source
    image ``image_indices[r]``; caption ``j`` (``captions[j]``) describes image row ``text_to_image[j]``.
    """

    image_features: torch.Tensor
    image_indices: np.ndarray
    text_features: torch.Tensor
    captions: list[str]
    text_to_image: torch.Tensor


@dataclass
class EvalResult:
    """What one evaluation measured, and on how much data.

    ``task``: ``zeroshot``, ``retrieval``, ``linear_probe`` or ``fewshot``. ``metrics``: plain floats (the keys of
    ``zeroshot_metrics``, ``retrieval_metrics`` or the probe's ``lp_*``, without the confusion matrix).
    ``settings``: what a probe chose or was given (``fewshot_k``, ``seed``, ``l2_lambda`` ...), written among the
    metrics as CLIP_benchmark writes its probe's. ``num_images`` / ``num_captions`` count what was evaluated;
    ``skipped_images`` / ``skipped_captions`` what was left out because its image was unreadable.
    """

    task: str
    metrics: dict[str, float]
    num_images: int
    skipped_images: int
    num_captions: int = 0
    skipped_captions: int = 0
    confusion_matrix: list[list[int]] | None = None  # classification: row = true class, column = top-1 prediction
    classnames: list[str] | None = None
    embeddings: RetrievalEmbeddings | None = None
    skipped: list[SkippedSample] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    ties: str = "pessimistic"
    num_train_images: int = 0  # a probe: the images it was fitted on (few-shot: K per class)


def dataset_label(data: DataConfig) -> str:
    """A short name for the data a result was measured on: CLIP_benchmark's ``wds/<name>`` for shards in its
    ``wds_<name>/`` folder layout, else ``kind:path`` and ``:split`` where the kind has splits (``emoji:test``,
    ``manifest:data/test.csv``, ``cifar:data/cifar-10-batches-py:test``). Reads no file."""
    path = str(data.get("path", ""))
    if data.kind == "webdataset" and path and "{" not in path and not path.endswith(".tar"):
        folder = Path(path).resolve()
        found = next((f.name for f in (folder, folder.parent) if f.name.startswith("wds_")), "")
        if found:
            return f"wds/{found.removeprefix('wds_')}"
    return ":".join(part for part in (data.kind, path, data.get("split", "")) if part)


def model_label(model: ModelConfig) -> str:
    """The architecture in one word, from the model's config: ``<image tower>+<text tower>``, each its ``name``
    (timm, torchvision, Hugging Face towers) or its shape (built-in towers), e.g.
    ``vit-p32-w768-d12-224px+transformer-w512-d12`` (a ViT-B/32 CLIP) or ``timm:convnext_base+hf:bert-base-uncased``."""
    image, text = model.image, model.text
    if image.kind == "vit":
        size = f"-{image.image_size}px" if image.image_size else ""
        image_part = f"vit-p{image.patch_size}-w{image.width}-d{image.depth}{size}"
    else:
        image_part = f"{image.kind}:{image.name}"
    text_part = f"transformer-w{text.width}-d{text.depth}" if text.kind == "transformer" else f"hf:{text.name}"
    return f"{image_part}+{text_part}"


def _with_nan(result: EvalResult) -> dict[str, Any]:
    """The metrics, with NaN where CLIP_benchmark writes NaN instead of leaving a key out, and the probe's settings."""
    metrics: dict[str, Any] = dict(result.metrics)
    if result.task == "zeroshot":
        metrics.setdefault("acc5", math.nan)  # zeroshot_metrics leaves acc5 out below 5 classes
        metrics = {key: metrics[key] for key in ("acc1", "acc5", *result.metrics) if key in metrics}
    metrics.update(result.settings)
    return metrics


def benchmark_record(
    result: EvalResult, dataset: str, model: str, pretrained: str, language: str = DEFAULT_LANGUAGE
) -> dict[str, Any]:
    """The result in CLIP_benchmark's layout, keys in its order: ``dataset``, ``model``, ``pretrained``, ``task``
    (``zeroshot_classification``, ``zeroshot_retrieval`` or ``linear_probe``), ``metrics``, ``language``."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": BENCHMARK_TASKS[result.task],
        "metrics": _with_nan(result),
        "language": language,
    }


def write_results_json(path: str | Path, record: dict[str, Any], replace: bool = False) -> Path:
    """Write a :func:`benchmark_record` as indented JSON to ``path`` (its folder is created), atomically: an
    interrupted write leaves the old file, never half a new one. Keys keep CLIP_benchmark's order; NaN is written
    ``NaN`` as CLIP_benchmark's ``json.dump`` writes it. ``replace``: the caller owns ``path``."""
    return atomic_write_text(path, json.dumps(record, indent=2) + "\n", replace=replace)


def results_file_name(record: dict[str, Any]) -> str:
    """CLIP_benchmark's default output name, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``, each part
    made safe for a file name (``/``, ``:`` and spaces become ``_``; a long part is cut); a K-shot probe (its
    ``fewshot_k`` metric > 0) adds ``_{K}shot``, so it never shares a name with the full probe of the same data."""
    parts = [record[key] for key in ("dataset", "pretrained", "model", "language", "task")]
    shots = record.get("metrics", {}).get("fewshot_k", -1)
    if isinstance(shots, int) and shots > 0:
        parts.append(f"{shots}shot")
    return "_".join(re.sub(r"[^A-Za-z0-9.+=@-]+", "_", str(part)).strip("_")[:80] for part in parts) + ".json"


def format_results_table(result: EvalResult, dataset: str, model: str) -> str:
    """A plain-text table of the metrics, headed by what was measured on how much data."""
    if result.task == "retrieval":
        counted = f"{result.num_images} images, {result.num_captions} captions"
    else:
        counted = f"{result.num_images} images, {len(result.classnames or [])} classes"
        if result.num_train_images:
            counted += f"; fitted on {result.num_train_images} images"
    if result.skipped_images:
        counted += f"; skipped {result.skipped_images} unreadable images"
        counted += f" ({result.skipped_captions} captions)" if result.task == "retrieval" else ""
    shown = dict(result.metrics)
    width = max(len(key) for key in [*shown, *result.settings])
    lines = [f"{BENCHMARK_TASKS[result.task]} of {model}", f"on {dataset} ({counted}; ties: {result.ties})"]
    lines.append(f"  {'metric':<{width}}  {'value':>8}")
    for key, value in shown.items():
        text = f"{value:8.2f}" if key.endswith("_rank") else f"{value:8.4f}"
        lines.append(f"  {key:<{width}}  {text}")
    for key, value in result.settings.items():
        text = f"{value:8.2e}" if isinstance(value, float) else f"{value!s:>8}"
        lines.append(f"  {key:<{width}}  {text}")
    return "\n".join(lines)
