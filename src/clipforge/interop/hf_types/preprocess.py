"""A Hugging Face folder's image processor as clipforge's resize rule (import), and back (export).

Import (:func:`read_preprocess`): ``preprocessor_config.json`` -> ``model.image.mean`` / ``std`` /
``interpolation`` and the resize rule, what ``AutoImageProcessor.from_pretrained(folder)`` does by default, exactly.
Whose defaults fill what the file leaves out is told by its ``image_processor_type`` (backend suffixes ``Pil`` /
``Fast`` dropped), else by the model type (:data:`MODEL_TYPE_PROCESSORS`). transformers 5 resizes with its
torchvision backend by default and center-crops at (resized - crop) // 2: imports read ``resize_backend:
torchvision``, ``crop_rounding: floor``.

* ``size: {height, width}`` without a crop -> ``squash`` (SigLIP's processor; Chinese-CLIP's released configs);
* ``size: {shortest_edge}`` with a center crop of the model's size -> ``shortest`` with ``resize_size`` = the edge
  (CLIP's);
* ``Siglip2ImageProcessor`` -> ``naflex``: its ``patch_size`` (the model's) and ``max_num_patches`` budget.

What has no exact counterpart (``longest_edge``, a non-square or missing crop, a resize that is off) is logged and
read as the family's own rule at the model's image size.

Export (:func:`image_processor`): ``naflex`` -> ``Siglip2ImageProcessor``; ``squash`` -> ``SiglipImageProcessor``
resizing to ``{height, width}``; ``shortest`` -> ``CLIPImageProcessor`` with ``shortest_edge`` = ``resize_size``
and the ``image_size`` center crop (a Chinese-CLIP model gets its own ``ChineseCLIPImageProcessor`` for either);
mean/std and interpolation are the checkpoint's. :func:`processor_differences` says where transformers' default
processor still differs from the checkpoint's rule (a PIL resize, a crop rounded half to even).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from clipforge.config import CheckpointError
from clipforge.data.transforms import ImagePreprocess
from clipforge.model.vision import CLIP_MEAN, CLIP_STD

logger = logging.getLogger("clipforge")

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# PIL's resampling filters as image processors store them -> clipforge's interpolation names
PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
PIL_FILTERS = {name: code for code, name in PIL_RESAMPLE.items()}
# the image processor of each model type, when its folder does not name one
MODEL_TYPE_PROCESSORS = {
    "clip": "CLIPImageProcessor",
    "metaclip_2": "CLIPImageProcessor",
    "altclip": "CLIPImageProcessor",
    "chinese_clip": "ChineseCLIPImageProcessor",
    "siglip": "SiglipImageProcessor",
    "siglip2": "Siglip2ImageProcessor",
}
# each processor's rule family: CLIP's (short side + center crop, CLIP's mean/std, bicubic), SigLIP's (squash, 0.5,
# bicubic) or NaFlex (0.5, bilinear, patches)
PROCESSOR_FAMILIES = {
    "CLIPImageProcessor": "clip",
    "ChineseCLIPImageProcessor": "clip",
    "SiglipImageProcessor": "siglip",
    "Siglip2ImageProcessor": "naflex",
}
FAMILY_DEFAULTS = {  # mean, std, resample
    "clip": (CLIP_MEAN, CLIP_STD, 3),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD, 3),
    "naflex": (SIGLIP_MEAN, SIGLIP_STD, 2),
}
NAFLEX_DEFAULT_PATCHES = 256  # Siglip2ImageProcessor's max_num_patches


def _size_dict(value: Any, square: bool) -> dict[str, Any]:
    """An image processor's ``size`` / ``crop_size`` as a dict; older configs store an int (``size`` = the short
    side, as transformers reads it for CLIP and SigLIP; ``crop_size`` = a square)."""
    if isinstance(value, dict):
        return {key: entry for key, entry in value.items() if entry is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    return {}


def processor_family(raw: dict[str, Any], model_type: str, where: str) -> str:
    """``clip`` | ``siglip`` | ``naflex``: whose defaults fill what ``raw`` leaves out (module docstring)."""
    name = str(raw.get("image_processor_type") or MODEL_TYPE_PROCESSORS[model_type])
    name = name.removesuffix("Fast").removesuffix("Pil")
    if name not in PROCESSOR_FAMILIES:
        fallback = PROCESSOR_FAMILIES[MODEL_TYPE_PROCESSORS[model_type]]
        logger.warning("%s: image_processor_type %r is unknown to clipforge; read as %s's", where, name, fallback)
        return fallback
    return PROCESSOR_FAMILIES[name]


def _resize_rule(raw: dict[str, Any], family: str, image_size: int, where: str) -> dict[str, Any]:
    """The resize fields of a CLIP or SigLIP processor config ``raw`` (see the module docstring)."""
    family_size = {"height": image_size, "width": image_size} if family == "siglip" else {}
    size = _size_dict(raw.get("size"), square=False) or family_size or {"shortest_edge": image_size}
    do_crop = raw.get("do_center_crop", family == "clip")
    crop = _size_dict(raw.get("crop_size"), square=True) or {"height": image_size, "width": image_size}
    # what transformers does whatever the sizes: crop offsets rounded down, its default backend's tensor resize
    rule = {"crop_rounding": "floor", "resize_backend": "torchvision"}
    square = {"height": image_size, "width": image_size}
    if raw.get("do_resize", True) and set(size) == {"height", "width"}:
        if size == square and (not do_crop or crop == square):
            return {**rule, "resize_mode": "squash"}
    elif raw.get("do_resize", True) and set(size) == {"shortest_edge"}:
        edge = int(size["shortest_edge"])
        if do_crop and crop == square and edge >= image_size:
            return {**rule, "resize_mode": "shortest", "resize_size": edge if edge != image_size else None}
    fallback = "squash" if family == "siglip" else "shortest"
    logger.warning(
        "%s: the image processor's resize (do_resize=%s, size=%s, do_center_crop=%s, crop_size=%s) has no exact "
        "clipforge counterpart for this %s px model; images are resized as %r at %s px, which differs from "
        "transformers' preprocessing on some images",
        where,
        raw.get("do_resize", True),
        size,
        do_crop,
        crop,
        image_size,
        fallback,
        image_size,
    )
    return {**rule, "resize_mode": fallback}


def _naflex_rule(raw: dict[str, Any], patch_size: int, where: str) -> dict[str, Any]:
    """The NaFlex fields of a ``Siglip2ImageProcessor`` config: its patch budget, checked against the model."""
    if raw.get("patch_size", patch_size) != patch_size:
        raise CheckpointError(
            f"{where}: the image processor cuts {raw['patch_size']} px patches but the model's are {patch_size} px; "
            "the folder's preprocessor_config.json belongs to another model"
        )
    if not raw.get("do_resize", True):
        raise CheckpointError(f"{where}: a NaFlex image processor with do_resize=false has no clipforge counterpart")
    budget = int(raw.get("max_num_patches", NAFLEX_DEFAULT_PATCHES))
    return {"resize_mode": "naflex", "max_num_patches": budget, "resize_backend": "torchvision"}


def read_preprocess(folder: Path, model_type: str, vision: Any, image_size: int, where: str) -> dict[str, Any]:
    """``mean`` / ``std`` / ``interpolation`` and the resize rule of ``preprocessor_config.json`` (the model type's
    own without one) for a model with vision config ``vision`` and image size ``image_size`` (module docstring)."""
    path = folder / "preprocessor_config.json"
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    family = processor_family(raw, model_type, where)
    if (family == "naflex") != (model_type == "siglip2"):
        raise CheckpointError(
            f"{where}: a {model_type} model with a {raw.get('image_processor_type')} image processor has no "
            "clipforge counterpart: SigLIP 2's NaFlex models read variable-resolution patches "
            "(Siglip2ImageProcessor), the others square images"
        )
    mean, std, default_resample = FAMILY_DEFAULTS[family]
    resample = raw.get("resample", default_resample)
    interpolation = PIL_RESAMPLE.get(resample)
    if interpolation is None:
        logger.warning("%s: resample=%s has no clipforge counterpart; images are resized bicubic", where, resample)
        interpolation = "bicubic"
    if family == "naflex":
        rule = _naflex_rule(raw, vision.patch_size, where)
    else:
        rule = _resize_rule(raw, family, image_size, where)
    return {
        "mean": [float(v) for v in raw.get("image_mean", mean)],
        "std": [float(v) for v in raw.get("image_std", std)],
        "interpolation": interpolation,
        **rule,
    }


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def image_processor(preprocess: ImagePreprocess, model_type: str):
    """The transformers image processor of ``preprocess``'s rule (module docstring)."""
    import transformers

    common = {
        "image_mean": list(preprocess.mean),
        "image_std": list(preprocess.std),
        "resample": PIL_FILTERS[preprocess.interpolation],
    }
    if preprocess.resize_mode == "naflex":
        return transformers.Siglip2ImageProcessor(
            patch_size=preprocess.patch_size, max_num_patches=preprocess.max_num_patches, **common
        )
    size = {"height": preprocess.image_size, "width": preprocess.image_size}
    if model_type == "chinese_clip":
        if preprocess.resize_mode == "squash":
            return transformers.ChineseCLIPImageProcessor(size=size, do_center_crop=False, crop_size=size, **common)
        shortest = {"shortest_edge": preprocess.short_side}
        return transformers.ChineseCLIPImageProcessor(size=shortest, crop_size=size, **common)
    if preprocess.resize_mode == "squash":
        return transformers.SiglipImageProcessor(size=size, **common)
    return transformers.CLIPImageProcessor(size={"shortest_edge": preprocess.short_side}, crop_size=size, **common)


def processor_differences(preprocess: ImagePreprocess) -> list[str]:
    """What transformers' default image processor does otherwise than ``preprocess`` (empty: nothing)."""
    notes = []
    if preprocess.resize_mode == "shortest" and preprocess.crop_rounding != "floor":
        notes.append(
            "its center crop rounds the offset (resized - crop) / 2 down where this checkpoint rounds half to even "
            "(crop_rounding: round), one pixel apart on some non-square images"
        )
    if preprocess.resize_backend != "torchvision":
        notes.append(
            "by default it resizes with torchvision on tensors where this checkpoint resizes with PIL (one level "
            "apart in a few pixels); AutoImageProcessor.from_pretrained(folder, backend='pil') resizes as it does"
        )
    return notes
