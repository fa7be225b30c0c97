"""What a weights spec resolves to (``clipforge.interop.load.resolve``): the importers and the checkpoint reader all
give this, and the model factory builds from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipforge.config import Config
from clipforge.data.processor import Processor


@dataclass
class Resolved:
    """A model's ``config`` (its model section describes the weights exactly), its ``weights`` in clipforge's names,
    its ``processor``, and ``source``: the spec, for messages. ``step``: the training step of a checkpoint's
    weights (0 for an import); ``hf_text_config``: a Hugging Face text tower's own config, when the model has one."""

    config: Config
    weights: dict[str, torch.Tensor]
    processor: Processor
    source: str
    step: int = 0
    hf_text_config: str | None = None
    imported_from: str | None = None
