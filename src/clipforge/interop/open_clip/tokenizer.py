"""The tokenizer open_clip gives a model config (its ``get_tokenizer``), as a clipforge tokenizer with the same ids.

* no ``hf_tokenizer_name``: CLIP's BPE (open_clip's ``SimpleTokenizer``; the vocabulary comes from the merges file
  open_clip ships, :mod:`clipforge.interop.clip_bpe`), captions cleaned by ``tokenizer_kwargs.clean`` (``lower`` by
  default), padded with id 0;
* ``hf_tokenizer_name``: that Hugging Face tokenizer (SigLIP's T5 / Gemma SentencePiece, BERT for CLIPA, XLM-R, mT5,
  NLLB, RoBERTa ...), from a local folder (the model folder of a ``local-dir:`` import, as open_clip reads it) or the
  hub; captions cleaned by ``tokenizer_kwargs.clean`` (``whitespace`` by default, SigLIP's ``canonicalize``), and
  ``strip_sep_token`` (CLIPA) replaces the separator by id 0.

open_clip pads every text to the context length; clipforge pads a batch to its longest text where the tower does
not read its padding (causal attention, a masked Hugging Face encoder), which gives the same embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.config import CheckpointError
from clipforge.data.text_clean import CLEAN_RULES
from clipforge.data.tokenize import Tokenizer, load_hf_tokenizer
from clipforge.interop.clip_bpe import clip_bpe_tokenizer
from clipforge.interop.open_clip.architecture import CLIP_BPE_VOCAB_SIZE

HF_RULES = ("clean", "strip_sep_token")


def _clean_rule(kwargs: dict[str, Any], default: str, where: str) -> str:
    rule = kwargs.pop("clean", default)
    if rule not in CLEAN_RULES:
        raise CheckpointError(
            f"{where}: text_cfg.tokenizer_kwargs.clean={rule!r} is unknown; open_clip's are {CLEAN_RULES}"
        )
    return rule


def open_clip_tokenizer(text_cfg: dict[str, Any], padding: str, where: str, folder: Path | None = None) -> Tokenizer:
    """The tokenizer of ``text_cfg`` (module docstring); ``folder``: a local model folder holding the Hugging Face
    tokenizer's files (open_clip's ``local-dir:``), read instead of ``hf_tokenizer_name``."""
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("tokenizer_mode"):
        raise CheckpointError(
            f"{where}: text_cfg.tokenizer_mode={text_cfg['tokenizer_mode']!r} (open_clip's experimental tokenizing) "
            "has no clipforge counterpart"
        )
    name = text_cfg.get("hf_tokenizer_name")
    if name:
        clean = _clean_rule(kwargs, "whitespace", where)
        strip_sep_token = bool(kwargs.pop("strip_sep_token", False))
        _refuse_unknown(kwargs, where)
        source = str(folder) if folder is not None else name
        return load_hf_tokenizer(
            source, f"{where} text_cfg.hf_tokenizer_name", padding, clean=clean, strip_sep_token=strip_sep_token
        )
    clean = _clean_rule(kwargs, "lower", where)
    _refuse_unknown(kwargs, where)
    vocab_size = text_cfg.get("vocab_size", CLIP_BPE_VOCAB_SIZE)
    if vocab_size != CLIP_BPE_VOCAB_SIZE:
        raise CheckpointError(
            f"{where}: text_cfg.vocab_size={vocab_size} without an hf_tokenizer_name, but open_clip's own tokenizer is "
            f"CLIP's {CLIP_BPE_VOCAB_SIZE}-token BPE"
        )
    return clip_bpe_tokenizer(padding, clean=clean)


def _refuse_unknown(kwargs: dict[str, Any], where: str) -> None:
    if kwargs:
        raise CheckpointError(
            f"{where}: text_cfg.tokenizer_kwargs {sorted(kwargs)} have no clipforge counterpart (clipforge reads "
            f"{list(HF_RULES)})"
        )
