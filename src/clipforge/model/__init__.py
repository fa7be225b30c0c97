"""The two-tower model: towers (vision, text), projection heads, and the factory that builds them."""

from clipforge.model.clip import CLIPModel, CLIPOutput
from clipforge.model.registry import (
    CLIP_INIT_LOG_LOGIT_SCALE,
    MAX_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOG_LOGIT_SCALE,
    SIGLIP_INIT_LOGIT_BIAS,
    count_parameters,
    create_model,
)
from clipforge.model.state_renames import rename_logit_scale, rename_logit_scale_in_optimizer
from clipforge.model.towers import Tower

__all__ = [
    "CLIP_INIT_LOG_LOGIT_SCALE",
    "CLIPModel",
    "CLIPOutput",
    "MAX_LOG_LOGIT_SCALE",
    "SIGLIP_INIT_LOGIT_BIAS",
    "SIGLIP_INIT_LOG_LOGIT_SCALE",
    "Tower",
    "count_parameters",
    "create_model",
    "rename_logit_scale",
    "rename_logit_scale_in_optimizer",
]
