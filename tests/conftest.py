"""Shared fixtures: tiny image-caption data written on the fly, and a tiny model config."""

from __future__ import annotations

import atexit
import contextlib
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from clipforge.config import Config, DataConfig, config_from_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 7, "large": 13}

# tiny models gain nothing from intra-op threads, and on a busy machine threads contend
torch.set_num_threads(1)

# what clipforge caches per machine (the CPU precision probe) goes to a folder of this test session, not ~/.cache
os.environ["CLIPFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="clipforge-test-cache-")
atexit.register(shutil.rmtree, os.environ["CLIPFORGE_CACHE_DIR"], True)


def draw_shape(colour: str, shape: str, size: str, image_size: int = 32) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), "white")
    draw = ImageDraw.Draw(image)
    centre, radius = image_size // 2, SIZES[size]
    box = (centre - radius, centre - radius, centre + radius, centre + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(
            [(centre, centre - radius), (centre - radius, centre + radius), (centre + radius, centre + radius)],
            fill=fill,
        )
    return image


def write_shapes_manifest(folder: Path) -> Path:
    """24 distinct images (4 colours x 3 shapes x 2 sizes), two captions each, as a CSV manifest."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                name = f"images/{size}_{colour}_{shape}.png"
                draw_shape(colour, shape, size).save(folder / name)
                rows.append((name, f"a {size} {colour} {shape}"))
                rows.append((name, f"{colour} {shape}, {size}"))
    manifest = folder / "train.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return manifest


@pytest.fixture
def shapes_manifest(tmp_path: Path) -> Path:
    return write_shapes_manifest(tmp_path / "shapes")


def tiny_config(manifest: Path, output_dir: Path, **sections) -> Config:
    """A model small enough to train for a few dozen steps in seconds on one CPU core."""
    values = {
        "model": {
            "embed_dim": 32,
            "image": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2},
            "text": {
                "kind": "transformer",
                "width": 48,
                "depth": 2,
                "heads": 2,
                "context_length": 16,
                "tokenizer": {"kind": "bpe", "vocab_size": 300},
            },
        },
        "data": {"kind": "manifest", "path": str(manifest), "augment": {"scale_min": 0.9}},
        "optim": {"lr": 2e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 5},
        "train": {"steps": 40, "batch_size": 16, "output_dir": str(output_dir), "checkpoint_every": 20, "seed": 0},
        "logging": {"log_every": 5, "backends": [], "progress": False},
    }
    for section, updates in sections.items():
        current = values.setdefault(section, {})
        if section == "data" and updates.get("kind", current["kind"]) != current["kind"]:
            # another kind is another source: only the settings every kind shares carry over (as with data.kind=...)
            current = values[section] = {
                key: value for key, value in current.items() if key in DataConfig.shared_fields()
            }
        current.update(updates)
    return config_from_dict(values)


def write_tiny_bert(folder: Path) -> Path:
    """A tiny random BERT with a WordPiece tokenizer over the shapes vocabulary, saved as a local folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = ["a", "small", "large", *COLOURS, *SHAPES, ","]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, shapes folder): the tiny ViT model trained 30 steps on the shapes, once per test session.

    For the tests of using a model (embed, search, classify, explain, serve), which need a real checkpoint
    but not a good one.
    """
    from clipforge.train.loop import train

    folder = tmp_path_factory.mktemp("use")
    manifest = write_shapes_manifest(folder / "shapes")
    # one thread: on a shared 2-core machine OpenMP's barriers make this tiny model's steps ~40x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(tiny_config(manifest, folder / "run", train={"steps": 30, "checkpoint_every": 30}))
    finally:
        torch.set_num_threads(threads)
    return result.checkpoint, manifest.parent / "images"


@contextlib.contextmanager
def another_writer(folder: Path, command: str = "embed") -> Iterator[int]:
    """Another process holding ``folder``'s writer lock (``clipforge.io.folder_lock``) inside the block; yields
    its pid. A lock is per process: this one's own nested takes would succeed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom clipforge.folders import folder_lock\nwith folder_lock(sys.argv[1], sys.argv[2]):\n"
            "    print('held', flush=True)\n    sys.stdin.read()",
            str(folder),
            command,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def processor_for(tokenizer, context_length: int = 16, image_size: int = 16, interpolation: str = "bilinear"):
    """A :class:`~clipforge.data.processor.Processor` of ``tokenizer`` (real or a test's own) for unit tests that
    need one without a model config: a square ``image_size`` view normalized with mean = std = 0.5."""
    from clipforge.data.processor import Processor
    from clipforge.data.transforms import ImagePreprocess

    return Processor(tokenizer, context_length, ImagePreprocess(image_size, (0.5,) * 3, (0.5,) * 3, interpolation))
