"""The installed CLIP_benchmark, driven on a clipforge model, and the files both read: the reference side of the
parity tests.

CLIP_benchmark calls ``model.encode_image(images)`` and ``model.encode_text(tokenizer(texts))`` and normalizes
the results itself; :class:`BenchmarkModel` gives a clipforge model that call shape (the raw projections, so the
normalization is CLIP_benchmark's own) and :func:`benchmark_tokenizer` packs the processor's token ids and
attention mask into the one tensor CLIP_benchmark moves around. Its image transform is the model's own
(``processor.image_transform()``), so both sides see the same pixels.

The files are written in the layouts CLIP_benchmark reads: STL-10's binary files (``stl10_binary/``), COCO
captions (``val2014/`` + a Karpathy-style ``coco_test_karpathy.json`` in COCO's format) and its ``wds_<name>/``
WebDataset folders (``test/0.tar ..``, ``nshards.txt``, ``classnames.txt``, templates, ``dataset_type.txt``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data.processor import Processor
from clipforge.model import CLIPModel

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


class BenchmarkModel(torch.nn.Module):
    """A clipforge model as CLIP_benchmark calls one (``encode_image``, ``encode_text`` of packed tokens)."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens (B, 2, L): ids and attention mask
        return self.model.encode_text(tokens[:, 0], tokens[:, 1], normalize=False)


def benchmark_tokenizer(processor: Processor):
    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        tokens = processor.text(list(texts))
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)

    return tokenize


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's own top-k accuracy, with ``.item()`` where it calls ``float()`` on an array (NumPy 2 refuses
    that); everything else as it is written there."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def make_benchmark_runnable_here(monkeypatch: pytest.MonkeyPatch) -> None:
    """The installed ``clip_benchmark``, NumPy-2 safe, its linear probe able to run on this CPU.

    Its probe asserts ``device == 'cuda'`` and moves tensors with ``.cuda()`` / ``.to('cuda')``: here those moves
    stay on the CPU (torch's DataParallel without GPUs calls the module directly); nothing else is changed.
    """
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    monkeypatch.setattr(linear_probe, "accuracy", _accuracy)
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cuda":
            return self
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)


def allow_fake_stl10(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks STL-10's published MD5 sums; files written by a test cannot match them."""
    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)


# ----------------------------------------------------------------------------------------------
# Files in CLIP_benchmark's layouts
# ----------------------------------------------------------------------------------------------
def colour_images(labels: Sequence[int], hues: np.ndarray, spread: float, seed: int, side: int = 12) -> np.ndarray:
    """(N, side, side, 3) uint8 images: image n a flat colour near class ``labels[n]``'s RGB ``hues`` row, moved by
    uniform noise of ``spread`` (so neighbouring classes overlap), with a little pixel noise on top."""
    rng = np.random.default_rng(seed)
    centres = hues[np.asarray(labels)] + rng.uniform(-spread, spread, (len(labels), 3))
    pixels = centres[:, None, None, :] + rng.uniform(-4, 4, (len(labels), side, side, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


STL10_HUES = np.array(  # ten colours spread around the hue circle, all bright: ten well-separated directions in RGB
    [[230, 40, 40], [230, 140, 30], [220, 220, 40], [120, 220, 40], [40, 200, 80],
     [40, 210, 210], [40, 120, 230], [90, 50, 230], [190, 50, 220], [230, 50, 150]],
    dtype=np.float64,
)  # fmt: skip


def write_stl10(root: Path, split: str, labels: Sequence[int], spread: float, seed: int) -> None:
    """STL-10's binary layout: ``stl10_binary/{split}_X.bin`` (N x 3 x 96 x 96 uint8, each channel column by
    column), ``{split}_y.bin`` (labels 1..10), ``class_names.txt``."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    images = colour_images(labels, STL10_HUES, spread, seed, side=96)
    images.transpose(0, 3, 2, 1).tofile(folder / f"{split}_X.bin")
    np.asarray([label + 1 for label in labels], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")


def write_coco(root: Path, images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> Path:
    """``root/val2014/COCO_val2014_<id>.png`` and ``root/coco_test_karpathy.json`` (COCO's captions format:
    ``images`` with id and file_name, ``annotations`` with image_id and caption), images listed in id order, the
    order pycocotools gives them in. PNG, so both frameworks decode the very same pixels."""
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for number, (image, texts) in enumerate(zip(images, captions, strict=True), start=1):
        name = f"COCO_val2014_{number:012d}.png"
        image.save(root / "val2014" / name)
        entries.append({"id": number, "file_name": name})
        annotations.extend(
            {"id": len(annotations) + 1, "image_id": number, "caption": text} for text in texts
        )  # fmt: skip
    path = root / "coco_test_karpathy.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path


def _png(pixels: np.ndarray | Image.Image) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_wds(
    folder: Path,
    samples: Sequence[dict],
    shard_size: int,
    split: str = "test",
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    retrieval: bool = False,
) -> Path:
    """CLIP_benchmark's ``wds_<name>/`` folder: ``split/0.tar ..`` of ``{key}.png`` + ``{key}.cls`` (label) or
    ``{key}.txt`` (captions, one a line), ``split/nshards.txt``, and beside them ``classnames.txt``,
    ``zeroshot_classification_templates.txt`` and, for retrieval, ``dataset_type.txt``. ``samples``: dicts with
    ``image`` (an array or a PIL image) and ``label`` or ``captions``."""
    shards = folder / split
    shards.mkdir(parents=True, exist_ok=True)
    count = (len(samples) + shard_size - 1) // shard_size
    for shard in range(count):
        with tarfile.open(shards / f"{shard}.tar", "w") as tar:
            for index in range(shard * shard_size, min(len(samples), (shard + 1) * shard_size)):
                sample = samples[index]
                key = f"s{index:07d}"
                members = [(f"{key}.png", _png(sample["image"]))]
                if "label" in sample:
                    members.append((f"{key}.cls", str(sample["label"]).encode()))
                if "captions" in sample:
                    members.append((f"{key}.txt", "\n".join(sample["captions"]).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (shards / "nshards.txt").write_text(f"{count}\n")
    if classnames is not None:
        (folder / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    if retrieval:
        (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder
