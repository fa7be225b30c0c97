"""A CLIP model whose towers are written by hand, so every evaluation answer is known in advance.

Image tower: the mean colour of the (un-normalized, [0, 1]) image, a 3-vector. Text tower: the sum over the
text's words of each colour word's RGB direction. A solid red image and "a photo of a red." therefore embed
to the same unit vector, and any other colour of the set scores strictly lower.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from clipforge.config import Config, config_from_dict
from clipforge.data.processor import Processor
from clipforge.model import CLIPModel
from clipforge.model.factory import make_processor

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
WORD_IDS = {name: position + 1 for position, name in enumerate(COLOURS)}  # 0: every other word, and padding


class ColourTokenizer:
    """Words -> ids: a colour word gets its own id, any other word 0. Same call signature as ``Tokenizer``."""

    pad_token_id = 0
    padding = "longest"  # right-padded to the longest text of the call, as ``Tokenizer.padding`` says
    vocab_size = len(WORD_IDS) + 1

    def __call__(self, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            [WORD_IDS.get(word, 0) for word in re.findall(r"[a-z]+", text.lower())][:context_length] for text in texts
        ]
        length = max(1, max(len(row) for row in rows))
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
        for position, row in enumerate(rows):
            input_ids[position, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[position, : len(row)] = 1
        return input_ids, attention_mask


class MeanColour(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3)


class ColourWords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(len(WORD_IDS) + 1, 3)
        for name, token in WORD_IDS.items():
            table[token] = torch.tensor(COLOURS[name], dtype=torch.float32) / 255
        self.embedding = nn.Embedding.from_pretrained(table)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (self.embedding(input_ids) * attention_mask[..., None]).sum(dim=1)  # (B, 3)


def colour_model() -> CLIPModel:
    return CLIPModel(
        MeanColour(), ColourWords(), nn.Identity(), nn.Identity(), init_log_logit_scale=math.log(100)
    ).eval()


def colour_config(**sections) -> Config:
    """Identity normalization, so the image tower sees pixel values in [0, 1]."""
    values = {
        "model": {
            "image": {"kind": "vit", "image_size": 8, "patch_size": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
            "text": {"context_length": 8},
        },
        **sections,
    }
    return config_from_dict(values)


def colour_processor(config: Config | None = None) -> Processor:
    """The processor of the hand-made model: :class:`ColourTokenizer` and :func:`colour_config`'s preprocessing."""
    return make_processor((config or colour_config()).model, ColourTokenizer())


def write_colour_set(
    folder: Path, per_class: int = 2, labels: dict[str, str] | None = None, label_column: bool = True
) -> Path:
    """Solid-colour images in ``folder/<colour>/<k>.png`` and a manifest ``folder/colours.csv`` listing them.

    Each image has two captions naming its colour. ``labels`` maps a colour to the label written for it
    (default: the colour itself), to build permuted-label controls.
    """
    rows = []
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            relative = f"{name}/{k}.png"
            Image.new("RGB", (12, 12), rgb).save(folder / relative)
            label = (labels or {}).get(name, name)
            rows.append((relative, f"a {name} square", label))
            rows.append((relative, f"something {name}", label))
    manifest = folder / "colours.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"] if label_column else ["image", "caption"])
        writer.writerows(rows if label_column else [row[:2] for row in rows])
    return manifest
