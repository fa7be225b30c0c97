"""Prompt templates for zero-shot classification, and class-name loading.

A template is a ``str.format`` string with one ``{}`` placeholder for the class name, e.g.
``"a photo of a {}."``. CLIP_benchmark writes the placeholder as ``{c}``; such templates are accepted and
rewritten to ``{}`` so the rest of the code knows a single form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from clipforge.config.templates import validate_templates

__all__ = ["TEMPLATE_SETS", "get_templates", "load_classnames", "split_dataset_suffix", "validate_templates"]

# The 80 ImageNet prompt templates. Source: Radford et al. 2021, "Learning Transferable Visual Models From
# Natural Language Supervision" (CLIP), prompt engineering notebook (Prompt_Engineering_for_ImageNet.ipynb).
# Kept in the published order so ensembles are reproducible template-for-template.
_OPENAI_IMAGENET = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]

# CIFAR-10/100: the 18 templates the CLIP authors published for CIFAR (Radford et al. 2021, CLIP repository,
# data/prompts.md): photo quality x article x size. Both CIFARs share them.
_CIFAR = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]

# Digits: the class names are "0".."9", so the prompt names the number (the CLIP authors' MNIST prompt, same source).
_MNIST = ['a photo of the number: "{}".']

# Fashion-MNIST: 28x28 grey-scale product shots of single garments on a plain background. Our own set: the
# wording stays with photos of one item, and adds the grey-scale and low-resolution look of the data.
_FASHION_MNIST = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of a {}.",
    "a low resolution photo of a {}.",
    "a blurry photo of a {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
    "a photo of a {}, a type of clothing.",
    "a photo of a {}, a fashion item.",
    "a small photo of a {}.",
]

# STL-10: the CLIP authors' two prompts for it (same source).
_STL10 = ["a photo of a {}.", "a photo of the {}."]

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "simple": ("a photo of a {}.",),
    "openai-imagenet": tuple(_OPENAI_IMAGENET),
    "cifar10": tuple(_CIFAR),
    "cifar100": tuple(_CIFAR),
    "mnist": tuple(_MNIST),
    "fashion-mnist": tuple(_FASHION_MNIST),
    "stl10": tuple(_STL10),
}
"""Named template sets for :func:`get_templates`. Tuples, so a caller cannot edit the shared set in place."""


def get_templates(spec: str | Sequence[str]) -> list[str]:
    """Resolve a template specification to a validated list of templates.

    ``spec`` may be, checked in this order:

    - a list of templates: validated and returned;
    - a name from :data:`TEMPLATE_SETS` (``simple``, ``openai-imagenet``, ``cifar10``, ...);
    - a single template containing ``{}`` (or ``{c}``): ``[spec]``;
    - a JSON file: ``path.json`` holding a list of templates, or ``path.json:dataset`` selecting one entry of
      CLIP_benchmark's ``{dataset_name: [templates]}`` layout.

    Raises ``ValueError`` explaining the accepted forms (and listing the dataset names found in a JSON
    mapping) when none applies.
    """
    if not isinstance(spec, str):
        return validate_templates(spec)
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    if "{}" in spec or "{c}" in spec:
        return validate_templates([spec])
    path, dataset = split_dataset_suffix(spec)
    if path is not None:
        return _templates_from_json(path, dataset)
    raise ValueError(
        f"unknown template spec {spec!r}: expected one of the named sets {sorted(TEMPLATE_SETS)}, a template "
        "containing '{}', or an existing JSON file ('file.json' holding a list, or 'file.json:dataset' for a "
        "{dataset: [templates]} mapping)"
    )


def load_classnames(path: str | os.PathLike[str], dataset: str) -> list[str]:
    """Class names of ``dataset`` from a CLIP_benchmark ``en_classnames.json``-style file ``{dataset: [names]}``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (listing the datasets the file has) when
    ``dataset`` is not in it or its entry is not a list of strings.
    """
    mapping = _read_json(Path(path))
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a JSON object {{dataset: [class names]}}, got {type(mapping).__name__}")
    if dataset not in mapping:
        raise ValueError(f"dataset {dataset!r} not found in {path}; available datasets: {sorted(mapping)}")
    names = mapping[dataset]
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: entry {dataset!r} must be a non-empty list of class-name strings")
    return list(names)


def split_dataset_suffix(spec: str) -> tuple[Path | None, str | None]:
    """``'a/b.json:cifar10'`` -> (path, 'cifar10'); ``'a/b.json'`` -> (path, None); (None, None) if no such file.

    The file is looked up as given first, so a path that itself contains ':' still works; only if that fails
    is the text after the last ':' taken as a dataset name.
    """
    if os.path.isfile(spec):
        return Path(spec), None
    head, separator, tail = spec.rpartition(":")
    if separator and tail and os.path.isfile(head):
        return Path(head), tail
    return None, None


def _templates_from_json(path: Path, dataset: str | None) -> list[str]:
    content = _read_json(path)
    if isinstance(content, list):
        if dataset is not None:
            raise ValueError(f"{path} holds a plain list of templates, so the ':{dataset}' suffix has no meaning")
        return validate_templates(content)
    if isinstance(content, dict):
        if dataset is None:
            raise ValueError(
                f"{path} maps dataset names to templates; pick one with '{path}:<dataset>', "
                f"available: {sorted(content)}"
            )
        if dataset not in content:
            raise ValueError(f"dataset {dataset!r} not found in {path}; available: {sorted(content)}")
        return validate_templates(content[dataset])
    raise ValueError(f"{path} must hold a JSON list of templates or a {{dataset: [templates]}} object")


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open(encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
