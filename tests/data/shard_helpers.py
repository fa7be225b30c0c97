"""Tiny WebDataset shards for tests, in img2dataset's layout, written with ``tarfile`` or the webdataset library."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from tests.conftest import COLOURS, SHAPES, SIZES, draw_shape


def shapes_samples() -> list[dict]:
    """The 24 shapes (4 colours x 3 shapes x 2 sizes) as samples: key, JPEG bytes, caption, label (the colour)."""
    samples = []
    for colour_index, colour in enumerate(COLOURS):
        for shape in SHAPES:
            for size in SIZES:
                buffer = io.BytesIO()
                draw_shape(colour, shape, size).save(buffer, format="JPEG", quality=95)
                samples.append(
                    {
                        "key": f"{len(samples):09d}",
                        "jpg": buffer.getvalue(),
                        "caption": f"a {size} {colour} {shape}",
                        "label": colour_index,
                    }
                )
    return samples


def _members(sample: dict, index: int) -> list[tuple[str, bytes]]:
    """img2dataset writes .jpg, .txt and a .json of metadata; every third sample here has its caption in .json only."""
    meta = {"key": sample["key"], "status": "success", "label": sample["label"]}
    members = [(f"{sample['key']}.jpg", sample["jpg"])]
    if index % 3 == 2:
        meta["caption"] = sample["caption"]
    else:
        members.append((f"{sample['key']}.txt", sample["caption"].encode()))
    members.append((f"{sample['key']}.json", json.dumps(meta).encode()))
    return members


def write_shards(folder: Path, samples: list[dict], shard_size: int, writer: str = "tarfile") -> str:
    """Write ``samples`` as ``folder/{00000..}.tar``; return the brace spec of the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    count = (len(samples) + shard_size - 1) // shard_size
    for shard in range(count):
        part = samples[shard * shard_size : (shard + 1) * shard_size]
        path = folder / f"{shard:05d}.tar"
        if writer == "webdataset":
            import webdataset

            with webdataset.TarWriter(str(path)) as sink:
                for index, sample in enumerate(part, start=shard * shard_size):
                    sink.write(
                        {"__key__": sample["key"], **{n.split(".", 1)[1]: d for n, d in _members(sample, index)}}
                    )
        else:
            with tarfile.open(path, "w") as tar:
                for index, sample in enumerate(part, start=shard * shard_size):
                    for name, data in _members(sample, index):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{count - 1:05d}}}.tar")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
