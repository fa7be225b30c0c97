"""Build a :class:`CLIPModel` from a :class:`ModelConfig`.

Each tower is picked by its config's explicit ``kind`` through the builder tables below (never by looking
at a model name), so adding a family is one entry here plus its builder.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from clipforge.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clipforge.model.clip import CLIPModel
from clipforge.model.heads import build_head
from clipforge.model.hosted_hf import build_naflex_tower
from clipforge.model.hosted_open_clip import build_open_clip_image_tower, build_open_clip_text_tower
from clipforge.model.locking import lock_tower, locked_submodules
from clipforge.model.text import build_hf_tower, build_transformer_tower
from clipforge.model.towers import Tower
from clipforge.model.vision import build_timm_tower, build_torchvision_tower, build_vit_tower

# The constants are logs, as the parameter they set (log_logit_scale = log t).
# CLIP starts at temperature 0.07, i.e. logits = (1 / 0.07) * cosine
CLIP_INIT_LOG_LOGIT_SCALE = math.log(1 / 0.07)
# SigLIP starts at t = 10, b = -10: almost every pair in a batch is a negative, so starting every logit
# strongly negative puts the model near that prior and avoids large early corrections (SigLIP paper)
SIGLIP_INIT_LOG_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
# the trainer clamps log_logit_scale to [0, this] after every step: the CLIP paper caps t at 100
MAX_LOG_LOGIT_SCALE = math.log(100.0)

IMAGE_TOWER_BUILDERS: dict[str, Callable[[ImageTowerConfig], Tower]] = {
    "vit": build_vit_tower,
    "torchvision": build_torchvision_tower,
    "timm": build_timm_tower,
    "naflex": build_naflex_tower,
    "open_clip": build_open_clip_image_tower,
}
# builders take (cfg, vocab_size, pad_token_id, the tower's own saved config or None)
TEXT_TOWER_BUILDERS: dict[str, Callable[[TextTowerConfig, int | None, int, str | None], Tower]] = {
    "transformer": lambda cfg, vocab_size, pad_token_id, _saved: build_transformer_tower(cfg, vocab_size, pad_token_id),
    "hf": build_hf_tower,
    "open_clip": build_open_clip_text_tower,
}
LOSS_INIT: dict[str, tuple[float, float | None]] = {
    "clip": (CLIP_INIT_LOG_LOGIT_SCALE, None),
    "siglip": (SIGLIP_INIT_LOG_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS),
}


def _pick(table: dict[str, Callable], kind: str, field: str) -> Callable:
    if kind not in table:
        raise ValueError(f"{field}={kind!r} is unknown; choose one of {sorted(table)}")
    return table[kind]


def create_model(
    config: ModelConfig,
    loss_kind: str = "clip",
    vocab_size: int | None = None,
    pad_token_id: int = 0,
    text_config_json: str | None = None,
) -> CLIPModel:
    """Build the two-tower model ``config`` describes.

    loss_kind: "clip" -> t = 1/0.07 (log_logit_scale = log(1/0.07)), no bias; "siglip" -> t = 10, bias -10.
    vocab_size / pad_token_id: the tokenizer's; vocab_size is required by the built-in text transformer.
    text_config_json: a Hugging Face text tower's own config as a checkpoint saved it (its architecture is built
    from it, with no folder or hub read).
    """
    init_log_logit_scale, init_logit_bias = _pick(LOSS_INIT, loss_kind, "loss.kind")  # type: ignore[misc]
    image_tower = _pick(IMAGE_TOWER_BUILDERS, config.image.kind, "model.image.kind")(config.image)
    text_builder = _pick(TEXT_TOWER_BUILDERS, config.text.kind, "model.text.kind")
    text_tower = text_builder(config.text, vocab_size, pad_token_id, text_config_json)
    lock_tower(image_tower, config.image.lock, "model.image.lock")
    lock_tower(text_tower, config.text.lock, "model.text.lock")
    image_head = build_head(
        config.image.head,
        image_tower.output_dim,
        config.embed_dim,
        config.image.head_dropout,
        "model.image",
        config.image.head_init,
        config.image.head_bias,
    )
    text_head = build_head(
        config.text.head,
        text_tower.output_dim,
        config.embed_dim,
        config.text.head_dropout,
        "model.text",
        config.text.head_init,
        config.text.head_bias,
    )
    return CLIPModel(
        image_tower,
        text_tower,
        image_head,
        text_head,
        init_log_logit_scale=init_log_logit_scale,
        init_logit_bias=init_logit_bias,
        locked_modules=locked_submodules(image_tower, "image_tower") + locked_submodules(text_tower, "text_tower"),
    )


def count_parameters(model: CLIPModel) -> dict[str, dict[str, int]]:
    """Parameter counts per part: {"image_tower": {"total": n, "trainable": m}, ..., "all": {...}}.

    Parts are the model's direct children plus "logit" (scale and bias) and "all" (everything).
    """
    counts: dict[str, dict[str, int]] = {}
    for part, module in model.named_children():
        params = list(module.parameters())
        counts[part] = {
            "total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    logit_params = [p for p in (model.log_logit_scale, model.logit_bias) if p is not None]
    counts["logit"] = {
        "total": sum(p.numel() for p in logit_params),
        "trainable": sum(p.numel() for p in logit_params if p.requires_grad),
    }
    counts["all"] = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return counts
