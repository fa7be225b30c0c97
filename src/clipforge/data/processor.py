"""The model's input contract in one object: images and texts in, the tensors the towers take out.

A :class:`Processor` has Hugging Face's shape: ``processor(images=..., text=..., return_tensors="pt")`` gives
``pixel_values`` (B, 3, S, S) float32, ``input_ids`` and ``attention_mask`` (B, L) int64; ``processor.images(...)``
and ``processor.text(...)`` give one side. A NaFlex model's (SigLIP 2, variable resolution) ``pixel_values`` are its
packed patches instead, (B, max_num_patches, patch_size^2 * 3 + 3) (:mod:`clipforge.data.naflex`; ``unpack`` gives
transformers' ``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes``). It holds the tokenizer with its context length and padding, and the
image preprocessing (size, resize rule, interpolation, mean/std: :class:`~clipforge.data.transforms.ImagePreprocess`).

It is resolved once, where a model's weights are resolved (a new run's config, an import, a checkpoint), saved in
every checkpoint (:meth:`state_dict`) and export, and returned with the loaded model (``loaded.processor``).
Training, evaluation, search, explain and the exports take it from there and never resolve preprocessing or pass a
context length themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipforge.config import AugmentConfig
from clipforge.data.base import decode_image
from clipforge.data.tokenize import Tokenizer
from clipforge.data.transforms import ImagePreprocess, build_image_transform
from clipforge.io import atomic_write_text

ImageInput = Image.Image | str | os.PathLike
# tokenizer_config.json entries that say where and how one machine loaded a tokenizer, not what the tokenizer is
MACHINE_LOCAL_KEYS = frozenset(
    {
        "name_or_path",
        "_name_or_path",
        "is_local",
        "local_files_only",
        "cache_dir",
        "_commit_hash",
        "token",
        "use_auth_token",
        "force_download",
        "proxies",
        "revision",
        "subfolder",
    }
)


def portable_tokenizer_config(config: dict[str, Any], model_max_length: int) -> dict[str, Any]:
    """``config`` (a ``tokenizer_config.json``) with ``model_max_length`` set, right padding and truncation (the
    processor's), and without the machine's own settings: :data:`MACHINE_LOCAL_KEYS`, and any entry whose value is
    an absolute path (a local file or cache folder)."""
    portable = {
        key: value
        for key, value in config.items()
        if key not in MACHINE_LOCAL_KEYS and not (isinstance(value, str) and os.path.isabs(value))
    }
    portable.update(model_max_length=int(model_max_length), padding_side="right", truncation_side="right")
    return portable


@dataclass
class Processor:
    """``tokenizer`` with ``context_length`` (the longest text the text tower reads, special tokens included) and
    the image ``preprocess``; see the module docstring."""

    tokenizer: Tokenizer
    context_length: int
    preprocess: ImagePreprocess

    def __post_init__(self) -> None:
        self._eval_transform = build_image_transform(self.preprocess)

    # -- turning inputs into tensors ---------------------------------------------------------------------
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        """``{"pixel_values", "input_ids", "attention_mask"}`` of what is given (at least one of ``images``,
        ``text``); a single image or string counts as a batch of one. Only ``return_tensors="pt"`` exists."""
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: clipforge returns PyTorch tensors ('pt')")
        if images is None and text is None:
            raise ValueError("the processor needs images=..., text=... or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if text is not None:
            out.update(self.text(text))
        return out

    def images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """(B, 3, S, S) float32 pixel values of PIL images or image files, by the evaluation transform (NaFlex:
        packed patches, see the module docstring)."""
        batch = [images] if isinstance(images, Image.Image | str | os.PathLike) else list(images)
        if not batch:
            raise ValueError("images is empty: a batch needs at least one image")
        return torch.stack([self.image(picture) for picture in batch])

    def image(self, picture: ImageInput) -> torch.Tensor:
        """(3, S, S) float32 pixel values of one PIL image or image file (``decode_image``'s bounds apply; NaFlex:
        its packed patches)."""
        if not isinstance(picture, Image.Image):
            picture = decode_image(picture)
        return self._eval_transform(picture)

    def text(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` (B, L) int64 of ``texts``, padded and cut as the model reads them."""
        input_ids, attention_mask = self.tokenizer(
            [texts] if isinstance(texts, str) else list(texts), self.context_length
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def image_transform(self, augment: AugmentConfig | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> (3, S, S) pixel values: the evaluation transform, or with ``augment`` the training one
        (random resized crop and the colour steps, see ``clipforge.data.transforms``)."""
        return self._eval_transform if augment is None else build_image_transform(self.preprocess, augment)

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    # -- saving --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)`` reads them) from which :meth:`from_state_dict` rebuilds
        this processor exactly."""
        return {
            "tokenizer": self.tokenizer.state_dict(),
            "context_length": int(self.context_length),
            "image": dataclasses.asdict(self.preprocess),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Processor:
        image = dict(state["image"])
        image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
        return cls(
            Tokenizer.from_state_dict(state["tokenizer"]), int(state["context_length"]), ImagePreprocess(**image)
        )

    def with_tokenizer(self, tokenizer: Tokenizer) -> Processor:
        """The same preprocessing with another tokenizer (an export that renumbers ids)."""
        return Processor(tokenizer, self.context_length, self.preprocess)

    def save_pretrained(self, folder: str | Path) -> None:
        """The tokenizer as transformers reads it into ``folder``, portable: its ``tokenizer_config.json`` says
        ``model_max_length`` = the context length and holds nothing of this machine (:func:`portable_tokenizer_config`);
        the image rule is written by each export in its own format."""
        self.tokenizer.save_pretrained(folder, self.context_length)
        config_path = Path(folder) / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            text = json.dumps(portable_tokenizer_config(config, self.context_length), indent=2, ensure_ascii=False)
            atomic_write_text(config_path, text + "\n", replace=True)

    def __getstate__(self) -> dict[str, Any]:  # loader workers get it through the state: one serialization path
        return self.state_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        rebuilt = Processor.from_state_dict(state)
        self.__dict__.update(rebuilt.__dict__)
