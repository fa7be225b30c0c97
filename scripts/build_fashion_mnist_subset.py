"""Build the packaged Fashion-MNIST subsets in ``src/clipforge/data/fashion_mnist/``: what ``clipforge demo``
reports zero-shot Fashion-MNIST on, so that a fresh machine prints the same report as the README.

Run once, from the repository root, on a machine with the Debian package ``dataset-fashion-mnist`` (Zalando's
IDX files, MIT/Expat licence); the output is committed::

    python scripts/build_fashion_mnist_subset.py

Each subset is the first 200 images of each class, in file order (``clipforge.demo.balanced_subset``): of the
10,000 test images (``t10k-*``, reported on the demo's ``test`` split) and of the 60,000 training images
(``train-*``, reported with ``--eval-split val``, disjoint from the test images). They are written in the IDX
layout the originals use (gzip, the same headers), so ``data.kind: idx`` reads them too: 2 x 2,000 images,
about 1.2 MB.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
OUT = Path("src/clipforge/data/fashion_mnist")
PER_CLASS = 200
LICENCE = "/usr/share/doc/dataset-fashion-mnist/copyright"


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    # mtime=0: building twice gives the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for part in ("t10k", "train"):
        images = read_idx(args.source / f"{part}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{part}-labels-idx1-ubyte.gz")
        picked = np.sort(np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)]))
        write_idx(args.out / f"{part}-images-idx3-ubyte.gz", images[picked])
        write_idx(args.out / f"{part}-labels-idx1-ubyte.gz", labels[picked])
        print(f"{part}: {len(picked)} images, {np.bincount(labels[picked]).tolist()} per class")
    shutil.copyfile(LICENCE, args.out / "LICENSE-fashion-mnist.txt")


if __name__ == "__main__":
    main()
