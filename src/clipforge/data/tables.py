"""Fork-friendly storage for the strings every source holds: image paths, captions, class names.

Forked loader workers copy every memory page whose Python objects they touch (reference counts are
written on read), so a list of a million ``str`` ends up copied once per worker. The tables here keep
strings as one UTF-8 byte buffer plus offsets: two NumPy arrays, shared between workers for free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StringTable:
    """Strings kept as one UTF-8 byte buffer plus offsets: two NumPy arrays instead of a list of str.

    A fixed-width ``np.str_`` array would also avoid the copy-on-read, but costs 4 bytes x the longest
    string for every string.
    """

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [text.encode("utf-8") for text in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(chunk) for chunk in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].tobytes().decode("utf-8")


class CaptionTable:
    """The captions of every image, grouped: ``table[i]`` is the list of image ``i``'s captions.

    ``offsets[i]:offsets[i + 1]`` are the positions of image ``i``'s captions in the flat caption order
    (the order evaluation uses for text-to-image retrieval).
    """

    def __init__(self, groups: Sequence[Sequence[str]]) -> None:
        self._captions = StringTable([text for group in groups for text in group])
        self.offsets = np.zeros(len(groups) + 1, dtype=np.int64)  # (num_images + 1,)
        np.cumsum([len(group) for group in groups], out=self.offsets[1:])

    def __len__(self) -> int:
        """Number of images."""
        return len(self.offsets) - 1

    @property
    def num_captions(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> list[str]:
        return [self._captions[i] for i in range(self.offsets[index], self.offsets[index + 1])]
