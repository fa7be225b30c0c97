"""Classification sets: an image folder per class (``imagefolder``), MNIST-family IDX files (``idx``) and the
CIFAR-10/100 python pickles (``cifar``), all read from local paths and never downloaded.

Each image has a label (``labels``, into ``classnames``) and one caption, its readable class name, so the
same set can train a model (name as caption) and measure zero-shot accuracy (labels + class names).
"""

from __future__ import annotations

import builtins
import codecs
import gzip
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipforge.data.base import DataError, check_index, decode_image
from clipforge.data.files import classnames_for, require_dir, require_file
from clipforge.data.tables import StringTable

# the extensions torchvision's ImageFolder accepts, plus WebP
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageFolderSource:
    """``root/<class folder>/<image>``: classes are the sorted folder names (torchvision's convention),
    images are found recursively inside each class folder (sorted, by extension).

    ``classnames``: a JSON list / TXT file with one readable name per class in folder order, or a JSON
    object mapping folder names to readable names (ImageNet's ``n01440764`` -> ``tench``); empty = the
    folder names, underscores read as spaces. ``captions(i)`` is ``[classname of image i]``.
    """

    def __init__(self, root: str | os.PathLike, classnames: str = "") -> None:
        expected = "a folder with one sub-folder of images per class (root/<class>/<image>)"
        self.root = require_dir(root, "imagefolder", expected)
        folders = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        paths: list[str] = []
        labels: list[int] = []
        for label, folder in enumerate(folders):
            for directory, subfolders, names in os.walk(self.root / folder):
                subfolders.sort()
                relative = Path(directory).relative_to(self.root)
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(str(relative / name))
                        labels.append(label)
        if not paths:
            found = f"sub-folders {folders[:5]}" if folders else "no sub-folders"
            raise DataError(
                f"data.kind='imagefolder': {self.root} has {found} and no images in them; expected {expected}, "
                f"images ending in {list(IMAGE_EXTENSIONS)}"
            )
        self._images = StringTable(paths)
        self.labels: np.ndarray | None = np.asarray(labels, dtype=np.int64)
        self.classnames: list[str] | None = (
            classnames_for(classnames, "imagefolder", len(folders), folders)
            if classnames
            else [folder.replace("_", " ") for folder in folders]
        )

    def __len__(self) -> int:
        return len(self._images)

    def load_image(self, index: int) -> Image.Image:
        return decode_image(self.root / self._images[check_index(index, len(self))])

    def captions(self, index: int) -> list[str]:
        return [self.classnames[self.labels[check_index(index, len(self))]]]

    def describe(self, index: int) -> str:
        return str(self.root / self._images[check_index(index, len(self))])


class ArrayImageSource:
    """Images already in memory as one uint8 array: (N, H, W) grey or (N, H, W, 3) RGB, with labels.

    ``load_image`` never raises ``ImageLoadError`` (the pixels are decoded at start); grey images come
    back as RGB. ``captions(i)`` is ``[classname of image i]``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classnames: list[str], origin: str) -> None:
        if len(images) != len(labels):
            raise DataError(f"{origin}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classnames)):
            raise DataError(
                f"{origin}: labels span [{labels.min()}, {labels.max()}] but there are {len(classnames)} classes"
            )
        self.images = images
        self.labels: np.ndarray | None = labels.astype(np.int64)
        self.classnames: list[str] | None = classnames
        self.origin = origin

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> Image.Image:
        pixels = np.ascontiguousarray(self.images[check_index(index, len(self))])
        return Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB").convert("RGB")

    def captions(self, index: int) -> list[str]:
        return [self.classnames[self.labels[check_index(index, len(self))]]]

    def describe(self, index: int) -> str:
        return f"{self.origin}[{check_index(index, len(self))}]"


# ----------------------------------------------------------------------------------------------
# MNIST-family IDX files
# ----------------------------------------------------------------------------------------------
IDX_EXPECTED = "an MNIST-family images file such as train-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"
_IDX_UBYTE = 0x08  # the only element type MNIST, Fashion-MNIST, KMNIST and EMNIST use


def _read_idx(path: Path, dims: int) -> np.ndarray:
    """The array in an IDX file (magic 0x0000 08 <dims>, then big-endian int32 sizes, then the bytes).

    An uncompressed file is memory-mapped (shared by forked workers, read lazily); a ``.gz`` one is read
    into memory.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        header = handle.read(4 + 4 * dims)
        data = handle.read() if path.suffix == ".gz" else None
    magic = header[:4]
    if len(header) < 4 + 4 * dims or magic[:2] != b"\x00\x00" or magic[2] != _IDX_UBYTE or magic[3] != dims:
        raise DataError(
            f"data.kind='idx': {path} does not start with the IDX header of a {dims}-d unsigned byte array "
            f"(magic 00 00 08 {dims:02x}, found {magic.hex(' ')}); expected {IDX_EXPECTED} and its labels file"
        )
    shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    size = int(np.prod(shape))
    if data is None:
        available = path.stat().st_size - len(header)
        if available < size:
            raise DataError(f"data.kind='idx': {path} is truncated: header says {shape}, file holds {available} bytes")
        return np.memmap(path, dtype=np.uint8, mode="r", offset=len(header), shape=shape)
    if len(data) < size:
        raise DataError(f"data.kind='idx': {path} is truncated: header says {shape}, file holds {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, count=size).reshape(shape)


def idx_labels_path(images_path: Path) -> Path:
    """``train-images-idx3-ubyte[.gz]`` -> the labels file beside it (``train-labels-idx1-ubyte[.gz]``),
    with or without ``.gz`` whichever exists."""
    name = images_path.name.replace("images", "labels").replace("idx3", "idx1")
    stem = name.removesuffix(".gz")
    for candidate in (images_path.with_name(name), images_path.with_name(stem), images_path.with_name(stem + ".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"data.kind='idx': no labels file beside {images_path}: looked for {images_path.with_name(stem)}[.gz]; "
        "the labels file of an IDX images file must lie in the same folder"
    )


def read_idx(path: str | os.PathLike, classnames: str = "") -> ArrayImageSource:
    """MNIST-family IDX images + labels; class names ``"0".."9"`` (digits) unless ``classnames`` says
    otherwise (a JSON/TXT file, or a shipped list such as ``fashion-mnist``)."""
    images_path = require_file(path, "idx", IDX_EXPECTED)
    if "idx1" in images_path.name:
        raise DataError(f"data.kind='idx': {images_path} is a labels file; data.path must be {IDX_EXPECTED}")
    images = _read_idx(images_path, 3)  # (N, rows, cols)
    labels = np.asarray(_read_idx(idx_labels_path(images_path), 1))
    num_classes = max(int(labels.max()) + 1, 10) if len(labels) else 10
    names = classnames_for(classnames, "idx", num_classes, [str(i) for i in range(num_classes)])
    return ArrayImageSource(images, labels, names, str(images_path))


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# ----------------------------------------------------------------------------------------------
CIFAR_EXPECTED = (
    "the cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta) or the cifar-100-python "
    "folder (train, test, meta)"
)
CIFAR_FOLDERS = ("cifar-10-batches-py", "cifar-100-python")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The NumPy callables an array pickle names, under the module names NumPy 1 and NumPy 2 write."""
    reconstruct = np.zeros(1).__reduce__()[0]  # multiarray._reconstruct, wherever this NumPy keeps it
    scalar = np.int64(0).__reduce__()[0]  # multiarray.scalar: how NumPy scalars pickle
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[module, "_reconstruct"] = reconstruct
        allowed[module, "scalar"] = scalar
    return allowed


# What a CIFAR batch may name: NumPy array reconstruction and plain containers and scalars. Python 2 wrote
# builtins as __builtin__; Python 3 writes bytes in protocol 2 as _codecs.encode(text, "latin1").
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_globals(),
    **{
        (module, name): getattr(builtins, name)
        for module in ("builtins", "__builtin__")
        for name in ("dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float", "bool")
    },
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR batches hold (:data:`_CIFAR_GLOBALS`).

    A pickle calls whatever global it names (``os.system`` as readily as ``numpy.ndarray``), so a plain
    ``pickle.load`` of a file from the internet runs its author's code. Every global is looked up in a fixed
    table instead of imported; anything else is refused before it is called.
    """

    def __init__(self, handle: Any, path: Path) -> None:
        super().__init__(handle, encoding="bytes")  # Python 2 str -> bytes, as the CIFAR keys are
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise DataError(
                f"data.kind='cifar': {self.path}: the CIFAR reader refuses to load '{module}.{name}': CIFAR batches "
                "hold only arrays, lists and strings, so this file is not one (or was tampered with)"
            )
        return found


def _unpickle(path: Path) -> dict:
    """A CIFAR batch or meta file: a pickled dict of bytes, lists and arrays written by Python 2."""
    with open(path, "rb") as handle:
        try:
            value = _CifarUnpickler(handle, path).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(
                f"data.kind='cifar': {path} is not a readable CIFAR python pickle ({error}); expected {CIFAR_EXPECTED}"
            ) from None
    if not isinstance(value, dict):
        raise DataError(
            f"data.kind='cifar': {path} holds a pickled {type(value).__name__}, not a dict; expected {CIFAR_EXPECTED}"
        )
    return value


def read_cifar(path: str | os.PathLike, split: str = "train", classnames: str = "") -> ArrayImageSource:
    """CIFAR-10 (``data_batch_*`` / ``test_batch``) or CIFAR-100 (``train`` / ``test``, fine labels).

    ``path`` is the extracted folder or the folder holding it. Class names from ``batches.meta`` /
    ``meta`` with underscores read as spaces (``aquarium_fish`` -> ``aquarium fish``), unless
    ``classnames`` gives others.
    """
    folder = require_dir(path, "cifar", CIFAR_EXPECTED)
    for child in CIFAR_FOLDERS:
        if (folder / child).is_dir():
            folder = folder / child
    if split not in ("train", "test"):
        raise DataError(
            f"data.kind='cifar': data.split={split!r} does not exist; the splits present are ['train', 'test']"
        )
    if (folder / "batches.meta").is_file():
        meta, label_key, names_key = folder / "batches.meta", b"labels", b"label_names"
        files = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
    elif (folder / "meta").is_file():
        meta, label_key, names_key = folder / "meta", b"fine_labels", b"fine_label_names"
        files = [folder / split]
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise FileNotFoundError(
            f"data.kind='cifar': {folder} has neither batches.meta nor meta (found {found}); expected {CIFAR_EXPECTED}"
        )
    if not files:
        raise FileNotFoundError(f"data.kind='cifar': {folder} has no data_batch_* files; expected {CIFAR_EXPECTED}")
    for file in files:
        require_file(file, "cifar", CIFAR_EXPECTED)
    batches = [_unpickle(file) for file in files]
    try:
        pixels = np.concatenate([np.asarray(batch[b"data"], dtype=np.uint8) for batch in batches])
        labels = np.concatenate([np.asarray(batch[label_key], dtype=np.int64) for batch in batches])
        raw_names = [name.decode("utf-8") for name in _unpickle(meta)[names_key]]
    except (KeyError, TypeError) as error:
        raise DataError(
            f"data.kind='cifar': {folder}: a pickle lacks the key {error}; expected {CIFAR_EXPECTED}"
        ) from None
    # rows are 3072 bytes: the 1024 red values of the 32x32 image, then green, then blue
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # (N, 32, 32, 3)
    default = [name.replace("_", " ") for name in raw_names]
    names = classnames_for(classnames, "cifar", len(raw_names), raw_names) if classnames else default
    return ArrayImageSource(images, labels, names, f"{folder}/{split}")
