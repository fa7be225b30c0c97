"""Text towers: each maps (input_ids (B, L) long, attention_mask (B, L) 0/1) to features (B, output_dim).

Padding is on the right: a row is ``n`` real tokens followed by ``L - n`` padding tokens, and
``attention_mask`` is 1 on the real ones.

* ``transformer``: the built-in CLIP-style causal :class:`TextTransformer` (or bidirectional, SigLIP's).
* ``hf``: a Hugging Face encoder through ``transformers.AutoModel`` (:class:`HFTextEncoder`); imported Chinese-CLIP
  and AltCLIP models host their text models here.
"""

from __future__ import annotations

import json
import logging

import torch
from torch import nn

from clipforge.config import ConfigError, TextTowerConfig
from clipforge.data.hf_loading import hf_from_pretrained, quiet_transformers
from clipforge.model.hosted_hf import set_hf_grad_checkpointing
from clipforge.model.towers import Tower, TransformerTower
from clipforge.model.transformer import DEFAULT_NORM_EPS, Transformer

logger = logging.getLogger("clipforge")

POOLINGS = ("eot", "cls", "mean", "eos", "argmax", "last")
# text models of two-tower Hugging Face models that AutoModel does not map (config model_type -> transformers class);
# hosted as they are, so their imports compute exactly what transformers computes
UNMAPPED_TEXT_MODELS = {"altclip_text_model": "AltCLIPTextModel", "chinese_clip_text_model": "ChineseCLIPTextModel"}


def pool_tokens(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    input_ids: torch.Tensor | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Reduce token states (B, L, D) to one vector per row (B, D).

    ``eot``: the state at the last real token, index = attention_mask.sum(1) - 1 (right padding).
    ``cls``: the state at position 0.
    ``mean``: sum_t mask_t * h_t / sum_t mask_t, so padding contributes exactly nothing.
    ``eos``: the state at the first position whose id is ``eos_token_id`` (position 0 in a row without one),
    as Hugging Face's CLIP pools.
    ``argmax``: the state at ``input_ids.argmax(-1)``, the first largest id: CLIP's end-of-text is its largest id
    (OpenAI's CLIP and open_clip pool so; Hugging Face too when its config says ``eos_token_id == 2``).
    ``last``: the state at position L - 1, padding or not (SigLIP, which pads every text to the full length).
    """
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    positions = pooled_positions(attention_mask, pooling, input_ids, eos_token_id, hidden.shape[1])
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]


def pooled_positions(
    attention_mask: torch.Tensor,
    pooling: str,
    input_ids: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    length: int | None = None,
) -> torch.Tensor:
    """(B,) the position each row's features are read from, for every pooling of :func:`pool_tokens` but
    ``mean`` (which reads them all); ``length``: the number of positions (default: the mask's)."""
    length = attention_mask.shape[1] if length is None else length
    if pooling == "eot":
        return (attention_mask.sum(dim=1) - 1).clamp(min=0).long()
    if pooling == "cls":
        return torch.zeros(attention_mask.shape[0], dtype=torch.long, device=attention_mask.device)
    if pooling == "last":
        return torch.full((attention_mask.shape[0],), length - 1, dtype=torch.long, device=attention_mask.device)
    if pooling == "argmax":
        return input_ids.argmax(dim=-1)
    if pooling == "eos":
        if eos_token_id is None:
            raise ValueError("text pooling='eos' needs the tokenizer's eos_token_id")
        return (input_ids == eos_token_id).int().argmax(dim=-1)
    raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")


def _check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )


class TextTransformer(TransformerTower):
    """CLIP-style text encoder: token + learned position embeddings, causal pre-LN blocks, final LayerNorm,
    then pooling (``eot`` by default: with causal attention only the last real token has read the whole text).

    Causal attention alone keeps padding out: with right padding every real position only attends to earlier
    real positions, so no key-padding mask is needed and the fused ``is_causal`` kernel applies.

    ``causal=False`` (SigLIP's text encoder) attends both ways over every position, padding included, exactly as
    SigLIP was trained: its tokenizer pads every text to the full length, so a caption always meets the same
    padding (``tokenizer.padding: max_length``). ``act`` / ``norm_eps``: the blocks' MLP activation and every
    LayerNorm's epsilon; ``eos_token_id``: the end-of-text id ``eos`` pooling looks for.
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
        *,
        act: str = "gelu",
        norm_eps: float = DEFAULT_NORM_EPS,
        causal: bool = True,
        eos_token_id: int | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")
        if pooling == "eos" and eos_token_id is None:
            raise ValueError("text pooling='eos' needs eos_token_id: the tokenizer's end-of-text id")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.pad_token_id = pad_token_id  # kept for export/interop; the forward never needs it (see class doc)
        self.pooling = pooling
        self.causal = causal
        self.eos_token_id = eos_token_id
        self.output_dim = width
        # No padding_idx: padding never reaches a real position, and CLIP's tokenizer pads with its
        # end-of-text id, whose embedding padding_idx would pin to zero.
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, depth, heads, mlp_ratio, act, norm_eps)
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
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
        if not return_attention and self.pooling != "mean":
            # one pooled position per row: the last block runs for it alone (Transformer.forward_one_token)
            positions = pooled_positions(attention_mask, self.pooling, input_ids, self.eos_token_id, length)
            return self.ln_final(self.transformer.forward_one_token(hidden, positions, is_causal=self.causal))
        attentions = None
        if return_attention:
            hidden, attentions = self.transformer(hidden, is_causal=self.causal, return_attention=True)
        else:
            hidden = self.transformer(hidden, is_causal=self.causal)
        features = pool_tokens(self.ln_final(hidden), attention_mask, self.pooling, input_ids, self.eos_token_id)
        return (features, attentions) if return_attention else features

    @property
    def supports_attention_maps(self) -> bool:
        return True

    @property
    def ignores_padding(self) -> bool:
        # causal: no real token attends to the padding after it; "last" pools a padding position itself. (The
        # bidirectional layout attends to padding: its features depend on the padded length.)
        return self.causal and self.pooling != "last"

    def forward_with_attention(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(features (B, width), per-layer attention (B, heads, L, L); causal unless ``causal=False``)``."""
        return self(input_ids, attention_mask, return_attention=True)


class HFTextEncoder(Tower):
    """A Hugging Face encoder (BERT, DistilBERT, RoBERTa, ...) pooled to one vector per text.

    pretrained: True or "default" -> ``AutoModel.from_pretrained(name)`` (the weights of ``name``); False or
    None -> ``AutoConfig.from_pretrained(name)`` + ``AutoModel.from_config`` (random weights); any other string
    -> ``AutoModel.from_pretrained(it)`` (a hub id or a local folder). ``name`` may itself be a local folder,
    and either may be ``package:<name>`` (a model folder inside a pip package, :mod:`clipforge.packaged`);
    local folders never consult the hub. A name that does not load raises ConfigError naming the field.
    ``config_json`` (a checkpoint's ``hf_text_config``) builds the architecture it describes instead, with no folder
    read; the text models of two-tower types that ``AutoModel`` does not map (:data:`UNMAPPED_TEXT_MODELS`:
    Chinese-CLIP's, AltCLIP's) are built as their own class. ``output_dim`` is what the model returns per token: its
    ``project_dim`` (AltCLIP projects every token) or its hidden size.

    Gradient checkpointing is the model's own (where it supports it); the encoder is one FSDP unit.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str | None = True,
        pooling: str = "cls",
        eos_token_id: int | None = None,
        config_json: str | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling={pooling!r} is unknown; choose one of {list(POOLINGS)}")
        self.name = name
        self.pooling = pooling
        self.eos_token_id = eos_token_id
        self.encoder = _load_encoder(name, pretrained, config_json)
        # BERT-like models carry a pooler (dense + tanh over [CLS]) trained for next-sentence prediction;
        # its parameters would get no gradient here (DDP then fails on unused parameters), so drop it.
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        config = self.encoder.config
        # AltCLIP's text model projects every token to project_dim; the others return their hidden states
        output_dim = getattr(config, "project_dim", None) or getattr(config, "hidden_size", None)
        output_dim = output_dim or getattr(config, "dim", None) or getattr(config, "d_model", None)
        if output_dim is None:
            raise ValueError(f"cannot tell the hidden size of Hugging Face model {name!r} from its config")
        self.output_dim = int(output_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and 0/1 mask -> pooled last hidden state (B, hidden_size)."""
        _check_text_inputs(input_ids, attention_mask)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return pool_tokens(hidden, attention_mask, self.pooling, input_ids, self.eos_token_id)

    def set_grad_checkpointing(self, enabled: bool = True) -> bool:
        return set_hf_grad_checkpointing(self.encoder, enabled)

    @property
    def ignores_padding(self) -> bool:
        return self.pooling != "last"  # the encoder masks padding out of attention

    def describe(self) -> str:
        return type(self.encoder).__name__

    def hf_config_json(self) -> str | None:
        return self.encoder.config.to_json_string()


def _load_encoder(name: str, pretrained: bool | str | None, config_json: str | None = None) -> nn.Module:
    """The encoder ``name``/``pretrained`` describe (see :class:`HFTextEncoder`), or the architecture
    ``config_json`` describes at random, and a log line that says which weights it got. ``None`` is what checkpoints
    load with (their own weights follow), so it is said only at debug level."""
    import transformers
    from transformers import AutoConfig, AutoModel

    if config_json is not None:
        values = json.loads(config_json)
        with quiet_transformers():
            config = AutoConfig.for_model(values.pop("model_type"), **values)
            if config.model_type in UNMAPPED_TEXT_MODELS:
                return getattr(transformers, UNMAPPED_TEXT_MODELS[config.model_type])(config)
            return AutoModel.from_config(config)
    weights = TextTowerConfig.resolve_weights(name, pretrained)
    if weights is None:
        config = hf_from_pretrained(AutoConfig.from_pretrained, name, "model.text.name")
        with quiet_transformers():
            encoder = AutoModel.from_config(config)
        logger.log(
            logging.DEBUG if pretrained is None else logging.INFO, "text tower: random init from %s's config", name
        )
        return encoder
    field = "model.text.name" if weights == name else "model.text.pretrained"
    encoder = hf_from_pretrained(AutoModel.from_pretrained, weights, field)
    logger.info("text tower: weights of %s", weights)
    return encoder


def resolve_pooling(cfg: TextTowerConfig) -> str:
    """``auto`` -> ``eot`` for the built-in tower, ``cls`` for Hugging Face encoders; else ``cfg.pooling``."""
    if cfg.pooling != "auto":
        return cfg.pooling
    return "eot" if cfg.kind == "transformer" else "cls"


def build_transformer_tower(cfg: TextTowerConfig, vocab_size: int | None, pad_token_id: int = 0) -> TextTransformer:
    """The built-in text transformer with ``cfg.vocab_size`` embedding rows, or the tokenizer's ``vocab_size``
    when that is null (one of the two is needed; the tokenizer may not have more ids than the rows)."""
    rows = cfg.vocab_size or vocab_size
    if rows is None:
        raise ValueError(
            "model.text.kind='transformer' needs vocab_size: pass the tokenizer's vocabulary size to create_model"
        )
    if vocab_size is not None and vocab_size > rows:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model.text.vocab_size={rows} embeds only {rows}; "
            "raise model.text.vocab_size or leave it null (the tokenizer's size)"
        )
    if isinstance(cfg.pretrained, str):
        raise ConfigError(
            f"model.text.pretrained={cfg.pretrained!r}: the built-in text transformer has no pretrained weights; "
            "leave it unset (load trained weights through a clipforge checkpoint) or use model.text.kind=hf"
        )
    return TextTransformer(
        vocab_size=rows,
        context_length=cfg.context_length,
        width=cfg.width,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        pad_token_id=pad_token_id,
        pooling=resolve_pooling(cfg),
        act=cfg.act,
        norm_eps=cfg.norm_eps,
        causal=cfg.causal,
        eos_token_id=cfg.eos_token_id,
    )


def build_hf_tower(
    cfg: TextTowerConfig, vocab_size: int | None = None, pad_token_id: int = 0, config_json: str | None = None
) -> HFTextEncoder:
    """A Hugging Face encoder; its vocabulary comes with the model. ``vocab_size``, when given, is only
    checked against the model's embedding table (a larger tokenizer would index past it). ``config_json``: the
    encoder's config as a checkpoint stores it (``hf_config_json``): the architecture is built from it, at random,
    with no folder or hub read (a checkpoint's weights follow)."""
    tower = HFTextEncoder(cfg.name, cfg.pretrained, resolve_pooling(cfg), cfg.eos_token_id, config_json)
    num_embeddings = tower.encoder.get_input_embeddings().num_embeddings
    if vocab_size is not None and vocab_size > num_embeddings:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but Hugging Face model {cfg.name!r} embeds only "
            f"{num_embeddings}; use the model's own tokenizer (model.text.tokenizer.kind='hf')"
        )
    max_positions = getattr(tower.encoder.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.context_length > max_positions:
        raise ConfigError(
            f"model.text.context_length={cfg.context_length} exceeds the {max_positions} positions "
            f"Hugging Face model {cfg.name!r} supports; lower model.text.context_length"
        )
    return tower
