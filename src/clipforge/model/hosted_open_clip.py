"""open_clip's own towers hosted behind the :class:`~clipforge.model.towers.Tower` interface (tower kind
``open_clip``), for the open_clip architectures the built-in towers cannot express.

An image tower is open_clip's ``visual`` module exactly as open_clip builds it from its model config: a timm trunk
with open_clip's pooling and projection head (SigLIP/SigLIP2 and PE-Core ViTs, EVA, MobileCLIP's FastViT, ViTamin,
ConvNeXt, Swin ...), a ModifiedResNet (RN50 ... RN50x64), or open_clip's ViT in a layout the built-in ViT has not
(CoCa's attentional pooler, layer scale, average pooling). A text tower is open_clip's text module: CoCa's text
transformer (a class token appended after the padding) or a Hugging Face encoder with open_clip's pooler and
projection (XLM-R, mT5, NLLB, RoBERTa). The projection into the joint space is inside the module, so the tower's
features are the embeddings before normalization and its head is ``identity``.

What the tower is built from travels in the config (``model.image.open_clip`` / ``model.text.open_clip``: the JSON
of ``embed_dim``, ``quick_gelu`` and the tower's ``vision_cfg`` / ``text_cfg``); a Hugging Face encoder's own config
travels in the checkpoint (``hf_text_config``), so a checkpoint rebuilds the tower without the hub. The module keeps
open_clip's parameter names under ``image_tower.visual.`` / ``text_tower.text.``, so weights go to and from open_clip
by a prefix. open_clip is needed only to build these towers: without it, one line names the extra to install.

Training features come from the module: activation checkpointing through its own switch (timm's, open_clip's
transformer's, Hugging Face's), its blocks as FSDP units and locking/layer-decay groups, Grad-CAM on the last stage
of a convolutional trunk. A convolutional trunk gets its images in channels-last layout, as the timm towers do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.config import ConfigError, ImageTowerConfig, TextTowerConfig
from clipforge.data.hf_loading import quiet_transformers
from clipforge.model.hosted_hf import set_hf_grad_checkpointing
from clipforge.model.towers import Tower
from clipforge.packaged import MissingPackageError

OPEN_CLIP_INSTALL = "pip install 'clipforge[open_clip]'"
# containers whose children are a tower's repeated blocks; the shallowest one found is taken (a ConvNeXt's stages,
# not the blocks inside its first stage)
BLOCK_CONTAINERS = ("resblocks", "blocks", "layer", "layers", "block", "stages")
RESNET_STAGE = re.compile(r"layer\d+")  # ModifiedResNet's layer1 ... layer4


class _FromOpenClip(logging.Filter):
    """Drops the records open_clip logs on the root logger (its progress lines: "Parsing model identifier ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Inside, open_clip's own log lines are held back (clipforge says what happens); errors still raise."""
    root, record_filter = logging.getLogger(), _FromOpenClip()
    root.addFilter(record_filter)
    try:
        yield
    finally:
        root.removeFilter(record_filter)


def open_clip_builders() -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """open_clip's own tower builders (``_build_vision_tower``, ``_build_text_tower``), or one line naming the extra."""
    try:
        from open_clip.model import _build_text_tower, _build_vision_tower
    except ImportError:
        raise MissingPackageError(
            f"this model hosts open_clip towers, which need open_clip: {OPEN_CLIP_INSTALL}"
        ) from None
    return _build_vision_tower, _build_text_tower


def tower_source(text: str, section: str, where: str) -> dict[str, Any]:
    """The tower's ``{"embed_dim", "quick_gelu", section}`` from its config field (ConfigError naming ``where``)."""
    try:
        source = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON ({error}); it holds what an open_clip import wrote") from None
    if not isinstance(source, dict) or not isinstance(source.get(section), dict) or "embed_dim" not in source:
        raise ConfigError(f'{where} must be JSON {{"embed_dim": ..., "{section}": {{...}}}}: open_clip\'s tower config')
    return source


def block_units(module: nn.Module) -> list[nn.Module]:
    """The module's repeated blocks in forward order: the children of its shallowest container named in
    :data:`BLOCK_CONTAINERS` (or a ModifiedResNet's ``layer1`` ... ``layer4``); empty when it has none."""
    found = [
        (name.count("."), name, child)
        for name, child in module.named_modules()
        if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(child, nn.ModuleList | nn.Sequential)
    ]
    if found:
        return list(min(found, key=lambda item: item[0])[2])
    return [child for name, child in module.named_children() if RESNET_STAGE.fullmatch(name)]


# ----------------------------------------------------------------------------------------------
# Image towers
# ----------------------------------------------------------------------------------------------
class OpenClipImageTower(Tower):
    """open_clip's ``visual`` module (module docstring): images (B, 3, S, S) -> features (B, embed_dim)."""

    def __init__(self, visual: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.output_dim = embed_dim
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in visual.modules()) > 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tower expects images of shape (batch, 3, H, W), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.visual(images)

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:  # a timm trunk: timm's own switch, which says when the architecture has none
            try:
                trunk.set_grad_checkpointing(enabled)
            except (AssertionError, NotImplementedError, AttributeError):
                return False
            return True
        if hasattr(self.visual, "transformer"):  # open_clip's ViT
            self.visual.set_grad_checkpointing(enabled)
            return True
        return False  # ModifiedResNet: open_clip's switch there does nothing

    def sharding_units(self) -> list[nn.Module]:
        return block_units(self.visual)

    def gradcam_block(self) -> nn.Module | None:
        # the last stage of the trunk, before open_clip's pooling and projection (attention pooling, a Linear):
        # Grad-CAM weighs its output where it is a (B, C, h, w) map, a CNN's; a ViT's blocks give tokens, and a
        # trunk whose stages give channels last (timm's Swin: B, h, w, C) is left to the search, which refuses it
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None and getattr(trunk, "output_fmt", "NCHW") != "NCHW":
            return None
        units = block_units(self.visual)
        return units[-1] if units else None

    def describe(self) -> str:
        trunk = getattr(self.visual, "trunk", None)
        inner = f" ({type(trunk).__name__})" if trunk is not None else ""
        return f"open_clip {type(self.visual).__name__}{inner}"


def build_open_clip_image_tower(cfg: ImageTowerConfig) -> OpenClipImageTower:
    """open_clip's image tower from ``cfg.open_clip``, at random (weights come from the import or checkpoint)."""
    source = tower_source(cfg.open_clip, "vision_cfg", "model.image.open_clip")
    _refuse_own_weights(cfg.pretrained, "model.image")
    # the pooled features only (output_tokens), and never timm's ImageNet weights: the full model's follow
    vision_cfg = {**source["vision_cfg"], "output_tokens": False, "timm_model_pretrained": False}
    build_vision, _ = open_clip_builders()
    with quiet_open_clip():
        visual = build_vision(source["embed_dim"], vision_cfg, bool(source.get("quick_gelu", False)))
    return OpenClipImageTower(visual, int(source["embed_dim"]))


def open_clip_image_size(cfg: ImageTowerConfig) -> int:
    """The image size of an ``open_clip`` image tower's ``vision_cfg`` (a square: open_clip's preprocessing)."""
    size = tower_source(cfg.open_clip, "vision_cfg", "model.image.open_clip")["vision_cfg"].get("image_size", 224)
    sizes = set(size) if isinstance(size, list | tuple) else {size}
    if len(sizes) != 1:
        raise ConfigError(f"model.image.open_clip: vision_cfg.image_size={size}: clipforge preprocesses square images")
    return int(sizes.pop())


def _refuse_own_weights(pretrained: Any, where: str) -> None:
    if pretrained not in (None, False, True, "default"):
        raise ConfigError(
            f"{where}.pretrained={pretrained!r}: an open_clip tower takes its weights from the model it was imported "
            "with (clipforge import open_clip:... or model.init), not from a file of its own"
        )


# ----------------------------------------------------------------------------------------------
# Text towers
# ----------------------------------------------------------------------------------------------
class OpenClipTextTower(Tower):
    """open_clip's text module (module docstring): (input_ids, attention_mask) (B, L) -> features (B, embed_dim).

    The module finds its padding from the ids (open_clip's rule: a Hugging Face encoder masks ``pad_token_id``, CoCa's
    text transformer masks ``pad_id`` and appends its class token after the padding), so ``attention_mask`` is not
    read; the tokenizer pads as the model was trained (CoCa: to the full context length).
    """

    def __init__(self, text: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.text = text
        self.output_dim = embed_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both have shape (batch, length), got {tuple(input_ids.shape)} and "
                f"{tuple(attention_mask.shape)}"
            )
        return self.text(input_ids)

    @property
    def _hf_model(self) -> nn.Module | None:
        return self.text.transformer if hasattr(self.text, "config") else None  # open_clip's HFTextEncoder

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        hf_model = self._hf_model
        if hf_model is not None:
            return set_hf_grad_checkpointing(hf_model, enabled)
        self.text.set_grad_checkpointing(enabled)  # open_clip's text transformer
        return True

    def sharding_units(self) -> list[nn.Module]:
        return block_units(self.text)

    def describe(self) -> str:
        hf_model = self._hf_model
        inner = f" ({type(hf_model).__name__})" if hf_model is not None else ""
        return f"open_clip {type(self.text).__name__}{inner}"

    def hf_config_json(self) -> str | None:
        if self._hf_model is None:
            return None
        values = json.loads(self.text.config.to_json_string())
        values.pop("_name_or_path", None)  # where it was read from: machine-local, and not what the model is
        return json.dumps(values, sort_keys=True)


def build_open_clip_text_tower(
    cfg: TextTowerConfig, vocab_size: int | None = None, pad_token_id: int = 0, config_json: str | None = None
) -> OpenClipTextTower:
    """open_clip's text tower from ``cfg.open_clip``, at random; a Hugging Face encoder is built from
    ``config_json`` (its config as the checkpoint or import holds it) when given, else from ``hf_model_name``'s
    config (a local folder, or the hub). ``vocab_size``: the tokenizer's, checked against the embedding rows."""
    source = tower_source(cfg.open_clip, "text_cfg", "model.text.open_clip")
    text_cfg = {**source["text_cfg"], "output_tokens": False}
    _, build_text = open_clip_builders()
    with _hf_source(text_cfg, config_json), quiet_transformers(), quiet_open_clip():
        text = build_text(source["embed_dim"], text_cfg, bool(source.get("quick_gelu", False)))
    rows = text.token_embedding.num_embeddings if hasattr(text, "token_embedding") else text.config.vocab_size
    if vocab_size is not None and vocab_size > rows:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but the open_clip text tower embeds only {rows}: use the model's "
            "own tokenizer"
        )
    return OpenClipTextTower(text, int(source["embed_dim"]))


@contextlib.contextmanager
def _hf_source(text_cfg: dict[str, Any], config_json: str | None) -> Iterator[None]:
    """Point a Hugging Face text config at its saved config (a temporary folder with ``config.json``), random init."""
    if not text_cfg.get("hf_model_name"):
        yield
        return
    text_cfg["hf_model_pretrained"] = False  # the full model's weights follow
    if config_json is None:
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_text(config_json, encoding="utf-8")
        text_cfg["hf_model_name"] = folder
        yield
