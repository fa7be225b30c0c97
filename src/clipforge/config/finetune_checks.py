"""Cross-field checks of the fine-tuning settings: LoRA adapters, patch dropout and the weights' moving average."""

from __future__ import annotations

from clipforge.config.errors import ConfigError
from clipforge.config.schema import Config, EMAConfig, ImageTowerConfig, LoraConfig, TextTowerConfig

# the image tower kinds that are vision transformers, where dropping patch tokens means something
PATCH_DROPOUT_KINDS = ("vit", "timm")


def validate_finetuning(config: Config) -> None:
    """LoRA on each tower, the image tower's patch dropout, and ``train.ema``; ConfigError naming the field."""
    image, text = config.model.image, config.model.text
    for where, tower in (("model.image", image), ("model.text", text)):
        _validate_lora(tower.lora, tower, where)
    _validate_patch_dropout(image)
    _validate_ema(config.train.ema)


def _validate_lora(lora: LoraConfig, tower: ImageTowerConfig | TextTowerConfig, where: str) -> None:
    if lora.rank < 0:
        raise ConfigError(f"{where}.lora.rank={lora.rank} must be >= 0 (0 = no adapters)")
    if not lora.enabled:
        return
    if not lora.alpha > 0:
        raise ConfigError(f"{where}.lora.alpha={lora.alpha} must be positive: the adapters' scale is alpha / rank")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"{where}.lora.dropout={lora.dropout} must lie in [0, 1)")
    if not lora.targets or len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(
            f"{where}.lora.targets={lora.targets}: name each role once, from [attention, mlp] (e.g. [attention])"
        )
    if tower.lock is not False:
        # a locked tower's features are a fixed function of its input (LiT: cached, memoized); adapters train it
        frozen = "it (a locked tower's features are computed once and cached)" if tower.lock is True else "part of it"
        raise ConfigError(
            f"{where}.lora.rank={lora.rank} trains adapters inside the tower, but {where}.lock={tower.lock!r} freezes "
            f"{frozen}: set {where}.lock=false (LoRA freezes the tower's own weights itself) or {where}.lora.rank=0"
        )


def _validate_patch_dropout(image: ImageTowerConfig) -> None:
    if not 0 <= image.patch_dropout < 1:
        raise ConfigError(
            f"model.image.patch_dropout={image.patch_dropout} must lie in [0, 1): the share of patch tokens "
            "dropped while training"
        )
    if image.patch_dropout > 0 and image.kind not in PATCH_DROPOUT_KINDS:
        raise ConfigError(
            f"model.image.patch_dropout={image.patch_dropout}: only vision transformers have patch tokens to drop "
            f"(model.image.kind in {list(PATCH_DROPOUT_KINDS)}), and kind={image.kind!r}: set it to 0"
        )


def _validate_ema(ema: EMAConfig) -> None:
    if not 0 <= ema.decay < 1:
        raise ConfigError(
            f"train.ema.decay={ema.decay} must lie in [0, 1) (0 = no moving average; 0.999 averages over ~1000 steps)"
        )
    if ema.every < 1:
        raise ConfigError(f"train.ema.every={ema.every} must be >= 1: the average is updated every that many steps")
    if ema.start_step < 0:
        raise ConfigError(f"train.ema.start_step={ema.start_step} must be >= 0")
