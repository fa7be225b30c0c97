"""The datasets of the torchvision ecosystem (STL10, Food101, Flowers102, OxfordIIITPet, ImageNet, ...) as sources.

``data.kind: torchvision`` with ``name`` (the ``torchvision.datasets`` class), ``path`` (its local root, laid
out as torchvision expects) and ``split``. Datasets are opened with ``download=False``: clipforge never fetches
them, so the files must be on disk already. The caption of an image is its class name (``classes`` of the
dataset, the first synonym for ImageNet's tuples), as for the other labelled sources; ``data.classnames`` (a file,
read as for ``imagefolder``) may replace the names. Labels are read from the dataset's label list, so opening one reads no image.

How each class takes its split: a ``split`` argument (STL10, Food101, Flowers102, OxfordIIITPet, ImageNet, DTD,
...), a ``train`` flag (``split: train | test``), or none (``split: all``). The CIFAR and LSUN readers of torchvision
unpickle their files, which can run code, so they are refused here: ``data.kind: cifar`` reads CIFAR safely.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, ImageLoadError, check_index
from clipforge.data.files import classnames_for

# torchvision readers that unpickle their data files (code could run): refused, with the safe alternative
UNSAFE = {"CIFAR10": "data.kind=cifar", "CIFAR100": "data.kind=cifar", "LSUN": "an imagefolder of its images"}
# where torchvision datasets keep their labels, tried in order: one label per image, read without decoding
_LABEL_ATTRIBUTES = ("targets", "labels", "_labels", "_samples", "samples")


def _dataset_class(name: str) -> type:
    import torchvision.datasets as datasets

    if name in UNSAFE:
        raise DataError(
            f"data.kind=torchvision name={name!r}: torchvision reads it with pickle, which can run code from the "
            f"file; use {UNSAFE[name]} instead"
        )
    found = getattr(datasets, name, None)
    if not inspect.isclass(found) or not issubclass(found, datasets.VisionDataset):
        known = sorted(n for n in datasets.__all__ if n not in UNSAFE)
        raise DataError(f"data.kind=torchvision name={name!r} is not a torchvision dataset; one of {known}")
    return found


def _split_arguments(dataset_class: type, split: str) -> dict[str, object]:
    parameters = inspect.signature(dataset_class.__init__).parameters
    arguments: dict[str, object] = {"download": False} if "download" in parameters else {}
    if "split" in parameters:
        arguments["split"] = split
    elif "train" in parameters:
        if split not in ("train", "test"):
            raise DataError(f"{dataset_class.__name__} has a train and a test part: use split=train or split=test")
        arguments["train"] = split == "train"
    elif split not in ("all", "train"):
        raise DataError(f"{dataset_class.__name__} has no splits: use split=all")
    return arguments


def _labels(dataset: object, name: str) -> np.ndarray:
    for attribute in _LABEL_ATTRIBUTES:
        values = getattr(dataset, attribute, None)
        if values is None:
            continue
        values = [value[1] if isinstance(value, tuple) else value for value in values]  # (path, label) pairs
        return np.asarray(values, dtype=np.int64)
    raise DataError(f"data.kind=torchvision name={name!r}: the dataset exposes no label list to read")


def _classnames(dataset: object, labels: np.ndarray) -> list[str]:
    classes = getattr(dataset, "classes", None)
    if classes is None:  # e.g. Flowers102: numbered classes only
        return [str(number) for number in range(int(labels.max()) + 1)]
    # ImageNet's classes are tuples of synonyms ("tench", "Tinca tinca"): the first is the common name
    return [entry[0] if isinstance(entry, tuple) else str(entry) for entry in classes]


class TorchvisionSource:
    """One split of a ``torchvision.datasets`` class read from ``root`` (module docstring)."""

    def __init__(self, name: str, root: str, split: str = "train", classnames: str = "") -> None:
        dataset_class = _dataset_class(name)
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data.kind=torchvision name={name!r}: folder {root!r} does not exist")
        try:
            self.dataset = dataset_class(root, **_split_arguments(dataset_class, split))
        except (RuntimeError, FileNotFoundError, ValueError) as error:
            # torchvision says "Dataset not found ... use download=True": clipforge never downloads
            raise DataError(
                f"data.kind=torchvision name={name!r} split={split!r}: {root} does not hold it as torchvision lays it "
                f"out ({str(error).splitlines()[0]}); clipforge never downloads data: put the files there first"
            ) from None
        self.name, self.root, self.split = name, root, split
        self.labels: np.ndarray | None = _labels(self.dataset, name)
        own = _classnames(self.dataset, self.labels)
        self.classnames: list[str] | None = classnames_for(classnames, "torchvision", len(own), own)

    def __len__(self) -> int:
        return len(self.labels)

    def load_image(self, index: int) -> Image.Image:
        try:
            image = self.dataset[check_index(index, len(self))][0]
        except (OSError, ValueError, SyntaxError) as error:  # Pillow's ways of saying the file is broken
            raise ImageLoadError(f"{self.describe(index)}: cannot decode the image ({error})") from error
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        return image.convert("RGB")

    def captions(self, index: int) -> list[str]:
        return [self.classnames[self.labels[check_index(index, len(self))]]]

    def describe(self, index: int) -> str:
        return f"torchvision {self.name}({self.root}, {self.split})[{check_index(index, len(self))}]"
