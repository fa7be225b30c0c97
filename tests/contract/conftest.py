"""A world of real inputs for the contract tests, made once per session, and a valid command line per command.

``World`` holds a trained tiny checkpoint, its images, a manifest, a data YAML, an embedding folder, a caption
file, a non-square query photo and shards. :func:`base_argv` gives, for each command, a command line that
succeeds on that world, writing under a folder of the test's own; the contract tests then break one thing at a
time. A command without an entry here fails ``test_every_command_has_a_base_command_line``: a new command is
covered by adding one line.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.contract.harness import run


@dataclass(frozen=True)
class World:
    checkpoint: Path
    images: Path
    manifest: Path
    data_yaml: Path
    store: Path
    texts: Path
    photo: Path
    shards: Path
    train_yaml: Path

    def inputs(self) -> list[Path]:
        """Every file and folder a command may read (their bytes must never change)."""
        return [self.checkpoint, self.images, self.manifest, self.data_yaml, self.texts, self.photo, self.shards]


def photo(size: tuple[int, int] = (97, 64), seed: int = 0) -> Image.Image:
    """A non-square colour picture with structure (gradients and blocks), not noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    pixels = np.stack([x, y, (x * y + rng.uniform(0, 0.1, x.shape)) % 1.0], axis=-1)
    return Image.fromarray((pixels * 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def world(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> World:
    checkpoint, images = tiny_checkpoint
    root = tmp_path_factory.mktemp("world")
    manifest = images.parent / "train.csv"
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"data": {"kind": "manifest", "path": str(manifest)}}))
    texts = root / "captions.txt"
    texts.write_text("a red circle\na blue square\na small green triangle\n")
    query = root / "query.jpg"
    photo((97, 64)).save(query, quality=92)
    store = root / "emb"
    shards = root / "shards"
    for argv in (
        ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--texts", str(texts), "--out", str(store)],
        ["data", "pack", "kind=manifest", f"path={manifest}", str(shards), "--shard-size", "10"],
    ):
        outcome = run(argv)
        assert outcome.code == 0, outcome.describe(argv)
    train_yaml = root / "train.yaml"
    train_yaml.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "embed_dim": 16,
                    "image": {"kind": "vit", "image_size": 32, "patch_size": 16, "width": 16, "depth": 1, "heads": 1},
                    "text": {
                        "width": 16,
                        "depth": 1,
                        "heads": 1,
                        "context_length": 8,
                        "tokenizer": {"vocab_size": 270},
                    },
                },
                "data": {"kind": "manifest", "path": str(manifest)},
                "train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "output_dir": str(root / "unused")},
                "logging": {"backends": [], "progress": False},
            }
        )
    )
    return World(checkpoint, images, manifest, data_yaml, store, texts, query, shards, train_yaml)


def copy_store(world: World, folder: Path) -> Path:
    """A private copy of the world's embedding folder (for commands that write into it)."""
    return Path(shutil.copytree(world.store, folder / "emb-copy"))


# command -> (World, a folder of the test's own) -> a command line that succeeds and writes only into that folder
BASE_ARGV: dict[str, Callable[[World, Path], list[str]]] = {
    "train": lambda w, d: ["train", str(w.train_yaml), f"train.output_dir={d / 'run'}"],
    "eval": lambda w, d: [
        "eval",
        "--checkpoint",
        str(w.checkpoint),
        "--task",
        "retrieval",
        "--data",
        "kind=manifest",
        f"path={w.manifest}",
        "--out",
        str(d / "results.json"),
        "--plot",
        str(d / "grid.png"),
    ],
    "data pack": lambda w, d: ["data", "pack", "kind=manifest", f"path={w.manifest}", str(d / "packed")],
    "data inspect": lambda w, d: ["data", "inspect", str(w.data_yaml), "--grid", str(d / "inspect.png")],
    "embed": lambda w, d: [
        "embed",
        "--checkpoint",
        str(w.checkpoint),
        "--images",
        str(w.images),
        "--texts",
        str(w.texts),
        "--out",
        str(d / "emb"),
    ],
    "search": lambda w, d: [
        "search",
        "--index",
        str(w.store),
        "--checkpoint",
        str(w.checkpoint),
        "--image",
        str(w.photo),
        "--grid",
        str(d / "hits.png"),
    ],
    "index build": lambda w, d: ["index", "build", "--index", str(copy_store(w, d))],
    "classify": lambda w, d: [
        "classify",
        "--checkpoint",
        str(w.checkpoint),
        "--labels",
        "red,blue",
        str(w.photo),
        "--plot",
        str(d / "bars.png"),
    ],
    "explain": lambda w, d: [
        "explain",
        "--checkpoint",
        str(w.checkpoint),
        "--image",
        str(w.photo),
        "--text",
        "red",
        "--out",
        str(d / "explain.png"),
        "--overlays",
        str(d / "overlays"),
    ],
    "import": lambda w, d: ["import", str(w.checkpoint), "--out", str(d / "imported.pt")],
    "merge": lambda w, d: [
        "merge",
        "--from",
        str(w.checkpoint),
        "--to",
        str(w.checkpoint),
        "--alpha",
        "0.5",
        "--out",
        str(d / "merged.pt"),
    ],
    "export onnx": lambda w, d: ["export", "onnx", "--checkpoint", str(w.checkpoint), "--out", str(d / "onnx")],
    "export hf": lambda w, d: ["export", "hf", "--checkpoint", str(w.checkpoint), "--out", str(d / "hf")],
    "export open_clip": lambda w, d: ["export", "open_clip", "--checkpoint", str(w.checkpoint), "--out", str(d / "oc")],
    # a server runs until stopped, and the demo trains for minutes: their inputs are checked in their own tests
    # (tests/search/test_server_limits.py, tests/test_demo.py); here only what fails before they start
    "serve": lambda w, d: ["serve", "--index", str(w.store), "--checkpoint", str(w.checkpoint), "--port", "70000"],
    "demo": lambda w, d: ["demo", "--output", str(d / "demo"), "--from-scratch", "train.steps=bogus"],
}
# the base command lines that do not succeed on purpose (see above): they stop at a checked argument
REFUSED_BASES = {"serve", "demo"}
