"""Several sources sampled together in set proportions (``data.kind: mix``).

The mix is the concatenation of its sources (image ``i`` of the mix is image ``i - offsets[s]`` of source
``s``) plus per-image sampling weights; the loader's sampler draws by those weights, so the proportions
hold however large or small each source is, and resume stays exact (see ``clipforge.data.loader``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from clipforge.config import UNLABELLED, DataConfig
from clipforge.data.base import DataError, ImageTextSource, check_index
from clipforge.data.sources import build_source


class MixSource:
    """Sources concatenated, with ``sample_weights`` so that source ``s`` is drawn with probability
    ``weights[s] / sum(weights)``, each of its images equally often.

    ``sample_weights``: (num_images,) float64 summing to 1; image ``j`` of source ``s`` has
    ``weights[s] / sum(weights) / len(source s)``. Labels and class names are dropped (None): the sources'
    label spaces differ, so a mix is for training on captions, not for zero-shot evaluation.
    """

    labels: np.ndarray | None = None
    classnames: list[str] | None = None
    capabilities = UNLABELLED

    def __init__(self, sources: Sequence[ImageTextSource], weights: Sequence[float]) -> None:
        if not sources or len(sources) != len(weights):
            raise DataError(f"a mix needs one weight per source: {len(sources)} sources, {len(weights)} weights")
        if any(not weight > 0 for weight in weights):
            raise DataError(f"mix weights must be positive, got {list(weights)}")
        for position, source in enumerate(sources):
            if len(source) == 0:
                raise DataError(f"data.mix[{position}] has no images")
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))  # (num_sources,)
        sizes = np.array([len(source) for source in sources], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # (num_sources + 1,)
        self.sample_weights = np.repeat(self.weights / sizes, sizes)  # (num_images,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source position, index inside that source) of mix image ``index``."""
        index = check_index(index, len(self))
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return source, index - int(self.offsets[source])

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source position of each mix index, vectorized: (n,) -> (n,)."""
        return np.searchsorted(self.offsets, np.asarray(indices), side="right") - 1

    def load_image(self, index: int) -> Image.Image:
        source, inner = self.locate(index)
        return self.sources[source].load_image(inner)

    def captions(self, index: int) -> list[str]:
        source, inner = self.locate(index)
        return self.sources[source].captions(inner)

    def describe(self, index: int) -> str:
        source, inner = self.locate(index)
        return f"mix[{source}]: {self.sources[source].describe(inner)}"


def read_mix(entries: Sequence[DataConfig]) -> MixSource:
    """``data.kind: mix``: each entry's source, drawn by the entries' ``weight``."""
    for position, entry in enumerate(entries):
        if not entry.capabilities.random_access:  # the mix's sampler draws images by index: refused before any read
            raise DataError(
                f"data.mix[{position}].kind={entry.kind!r}: a mix draws from map-style sources, and this one streams; "
                "it cannot be mixed"
            )
    return MixSource([build_source(entry) for entry in entries], [entry.weight for entry in entries])
