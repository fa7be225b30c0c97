"""The shape of one Hugging Face model type (:class:`HFModelType`) and what its functions are given."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipforge.config import ModelConfig
from clipforge.data.tokenize import Tokenizer
from clipforge.interop.keymaps import Rule


@dataclass(frozen=True)
class ImportContext:
    """What a type's ``model_section`` reads besides the transformers config: the spec's ``location`` (a folder or
    hub id: a hosted text tower's ``name``), the tokenizer's declared ``model_max_length`` (None: none; it bounds a
    hosted text tower's context length) and ``where`` (the spec, for messages)."""

    location: str
    declared_max_length: int | None
    where: str


@dataclass(frozen=True)
class ExportInputs:
    """What a type's ``export_config`` writes from: the ``model`` section in the type's canonical layout (identity
    heads and absent biases made explicit), the ``tokenizer`` as exported, the embedding rows, the end-of-text id
    the text tower pools at (None: it does not look for one), log t and a hosted text tower's own config (JSON)."""

    model: ModelConfig
    tokenizer: Tokenizer
    vocab_rows: int
    eos_token_id: int | None
    log_logit_scale: float
    text_config_json: str | None = None


@dataclass(frozen=True)
class HFModelType:
    """One Hugging Face model type (``config.json``'s ``model_type``), both ways.

    ``model_section(transformers config, context)``: the clipforge ``{"model": ..., "loss": ...}`` values that
    describe the model (the image preprocessing and the tokenizer are added by the importer);
    ``rules(model section, hosted text config JSON or None)``: the explicit key map between clipforge's tensors
    and the type's (import converts with it, export inverts it); ``export_config(inputs)``: the keyword arguments of ``config_class`` that an
    export writes. ``text_padding``: how its tokenizer pads (SigLIP's text tower reads padding: ``max_length``);
    ``text_inputs``: the ``model_input_names`` an exported tokenizer declares, the inputs transformers' pipeline then
    hands the model (SigLIP: ``input_ids`` alone, it reads no padding mask; None: the tokenizer's own);
    ``hosted_text``: its text tower is transformers' own module (``model.text.kind: hf``), built from
    ``text_config``, which checkpoints carry. ``file_renames``: (pattern, replacement) regular expressions that turn
    a tensor name of the type's weight files into the module's name, the renames transformers itself applies when it
    loads them (its ``conversion_mapping``; an export's ``save_pretrained`` writes the file names back): the maps
    speak the modules' names.
    """

    model_type: str
    model_class: str
    config_class: str
    model_section: Callable[[Any, ImportContext], dict[str, Any]]
    rules: Callable[[ModelConfig, str | None], list[Rule]]
    export_config: Callable[[ExportInputs], dict[str, Any]]
    text_padding: str = "longest"
    text_inputs: tuple[str, ...] | None = None
    hosted_text: bool = False
    file_renames: tuple[tuple[str, str], ...] = ()

    def module_name(self, file_name: str) -> str:
        """A tensor name of the type's weight files -> its name in transformers' module (``file_renames``)."""
        for pattern, replacement in self.file_renames:
            file_name = re.sub(pattern, replacement, file_name)
        return file_name
