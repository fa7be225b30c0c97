"""Text towers: each maps (input_ids (B, L) long, attention_mask (B, L) 0/1) to features (B, output_dim).

Padding is on the right: a row is ``n`` real tokens followed by ``L - n`` padding tokens, and
``attention_mask`` is 1 on the real ones.

* ``transformer``: the built-in CLIP-style causal :class:`TextTransformer`.
* ``hf``: a Hugging Face encoder through ``transformers.AutoModel`` (:class:`HFTextEncoder`).
"""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import TextTowerConfig
from clipforge.model.transformer import Transformer
from clipforge.packaged import hf_load_kwargs, resolve_location

POOLINGS = ("eot", "cls", "mean")


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Reduce token states (B, L, D) to one vector per row (B, D).

    ``eot``: the state at the last real token, index = attention_mask.sum(1) - 1 (right padding).
    ``cls``: the state at position 0.
    ``mean``: sum_t mask_t * h_t / sum_t mask_t, so padding contributes exactly nothing.
    """
    if pooling == "eot":
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")


def _check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )


class TextTransformer(nn.Module):
    """CLIP-style text encoder: token + learned position embeddings, causal pre-LN blocks, final LayerNorm,
    then pooling (``eot`` by default: with causal attention only the last real token has read the whole text).

    Causal attention alone keeps padding out: with right padding every real position only attends to earlier
    real positions, so no key-padding mask is needed and the fused ``is_causal`` kernel applies.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        pad_token_id: int = 0,
        pooling: str = "eot",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pad_token_id = pad_token_id  # kept for export/interop; the forward never needs it (see class doc)
        self.pooling = pooling
        self.output_dim = width
        # No padding_idx: padding never reaches a real position, and CLIP's tokenizer pads with its
        # end-of-text id, whose embedding padding_idx would pin to zero.
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, L) ids and 0/1 mask, L <= context_length -> features (B, width) (+ per-layer attention)."""
        _check_text_inputs(input_ids, attention_mask)
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"text input has {length} tokens but the text tower's context_length is {self.context_length}; "
                f"truncate in the tokenizer or raise model.text.context_length"
            )
        hidden = self.token_embedding(input_ids) + self.positional_embedding[:length]  # (B, L, width)
        attentions = None
        if return_attention:
            hidden, attentions = self.transformer(hidden, is_causal=True, return_attention=True)
        else:
            hidden = self.transformer(hidden, is_causal=True)
        features = pool_tokens(self.ln_final(hidden), attention_mask, self.pooling)
        return (features, attentions) if return_attention else features


class HFTextEncoder(nn.Module):
    """A Hugging Face encoder (BERT, DistilBERT, RoBERTa, ...) pooled to one vector per text.

    pretrained: None -> ``AutoConfig.from_pretrained(name)`` + ``AutoModel.from_config`` (random weights);
    "default" -> ``AutoModel.from_pretrained(name)``; any other string -> ``AutoModel.from_pretrained(it)``
    (a hub id or a local folder). ``name`` may itself be a local folder, and either may be ``package:<name>``
    (a model folder inside a pip package, :mod:`clipforge.packaged`); local folders never consult the hub.
    """

    def __init__(self, name: str, pretrained: str | None = None, pooling: str = "cls") -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")
        self.name = name
        self.pooling = pooling
        if pretrained is None:
            location = resolve_location(name)
            self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(location, **hf_load_kwargs(location)))
        else:
            location = resolve_location(name if pretrained == "default" else pretrained)
            self.encoder = AutoModel.from_pretrained(location, **hf_load_kwargs(location))
        # BERT-like models carry a pooler (dense + tanh over [CLS]) trained for next-sentence prediction;
        # its parameters would get no gradient here (DDP then fails on unused parameters), so drop it.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        config = self.encoder.config
        output_dim = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        output_dim = output_dim or getattr(config, "d_model", None)
        if output_dim is None:
            raise ValueError(f"cannot tell the hidden size of Hugging Face model {name!r} from its config")
        self.output_dim = int(output_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 0/1 mask -> pooled last hidden state (B, hidden_size)."""
        _check_text_inputs(input_ids, attention_mask)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return pool_tokens(hidden, attention_mask, self.pooling)


def resolve_pooling(cfg: TextTowerConfig) -> str:
    """``auto`` -> ``eot`` for the built-in tower, ``cls`` for Hugging Face encoders; else ``cfg.pooling``."""
    if cfg.pooling != "auto":
        return cfg.pooling
    return "eot" if cfg.kind == "transformer" else "cls"


def build_transformer_tower(cfg: TextTowerConfig, vocab_size: int | None, pad_token_id: int = 0) -> TextTransformer:
    """The built-in text transformer; it needs the tokenizer's ``vocab_size``."""
    if vocab_size is None:
        raise ValueError(
            "model.text.kind='transformer' needs vocab_size: pass the tokenizer's vocabulary size to create_model"
        )
    if cfg.pretrained is not None:
        raise ValueError(
            f"model.text.pretrained={cfg.pretrained!r}: the built-in text transformer has no named weights; "
            f"use null (load trained weights through a clipforge checkpoint)"
        )
    return TextTransformer(
        vocab_size=vocab_size,
        context_length=cfg.context_length,
        width=cfg.width,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        pad_token_id=pad_token_id,
        pooling=resolve_pooling(cfg),
    )


def build_hf_tower(cfg: TextTowerConfig, vocab_size: int | None = None, pad_token_id: int = 0) -> HFTextEncoder:
    """A Hugging Face encoder; its vocabulary comes with the model. ``vocab_size``, when given, is only
    checked against the model's embedding table (a larger tokenizer would index past it)."""
    tower = HFTextEncoder(cfg.name, cfg.pretrained, resolve_pooling(cfg))
    num_embeddings = tower.encoder.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > num_embeddings:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but Hugging Face model {cfg.name!r} embeds only "
            f"{num_embeddings}; use the model's own tokenizer (model.text.tokenizer.kind='hf')"
        )
    max_positions = getattr(tower.encoder.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.context_length > max_positions:
        raise ValueError(
            f"model.text.context_length={cfg.context_length} exceeds the {max_positions} positions "
            f"Hugging Face model {cfg.name!r} supports; lower model.text.context_length"
        )
    return tower
