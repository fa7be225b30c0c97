"""One small member of every family of open_clip's model registry, built offline, and the local stand-ins for what
their real configs fetch from the Hugging Face hub.

:data:`FAMILIES` maps a family to a real registry config and how it is shrunk: the text tower always (width 64, 2
layers, a short context), the image tower through the family's own config keys (open_clip's ViT, ModifiedResNet,
CoCa) or, for a timm tower, by registering a timm model that calls the family's own timm builder with smaller sizes
(:func:`shrunk_timm`: ``vit_base_patch16_siglip_224`` with width 64 and depth 2 is still timm's SigLIP ViT, MAP head
and all). :func:`write_member` writes it as open_clip's ``local-dir:`` folder (``open_clip_config.json``, the weights
of ``open_clip.create_model_and_transforms`` at random init, the tokenizer files), which both frameworks read.

Tokenizers and Hugging Face text configs that the real configs name on the hub are replaced by tiny local ones of the
same kind (:func:`write_tokenizer`: SentencePiece for T5 / XLM-R, a BPE for Gemma, WordPiece for BERT, trained here on
a small vocabulary; :func:`write_hf_text_config`: a random XLM-R / mT5 / NLLB (M2M-100) / RoBERTa config of 2 layers).
Where the real tokenizer's kind has no offline trainer (NLLB's, RoBERTa's byte-level BPE), the XLM-R stand-in is
used: the test is of the model and of open_clip's rules around the tokenizer, which are the same.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

WORDS = "a an the of photo small large red green blue yellow circle square squares triangle two side by x".split()
SENTENCES = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
CAPTIONS = ["A small red circle.", "two large blue squares, side by side!", "x", "a photo of a GREEN triangle"]
TEXT = {"width": 64, "heads": 2, "layers": 2}
VIT = {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8, "image_size": 32}
# timm builders' own size arguments, per timm model the registry names
TIMM_SIZES = {
    "vit_base_patch16_siglip_224": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8},
    "vit_base_patch32_siglip_256": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8},
    "vit_base_patch16_siglip_384": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8},
    "vit_pe_core_base_patch16_224": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "img_size": 32,
        "patch_size": 8,
        "ref_feat_shape": (4, 4),
        "attn_pool_num_heads": 2,
    },  # fmt: skip
    "fastvit_mci0": {"layers": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128)},
    "vit_base_mci_224": {"depth": 1, "img_size": 32},
    "vitamin_small_224": {"depth": 1, "img_size": 32},
    "convnext_tiny": {"depths": (1, 1, 1, 1), "dims": (16, 32, 64, 128)},
    "eva02_base_patch16_clip_224": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "img_size": 32,
        "patch_size": 8,
        "ref_feat_shape": (4, 4),
    },  # fmt: skip
    "eva_giant_patch14_224": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 28, "patch_size": 7},
    "swin_base_patch4_window7_224": {
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 2, 2),
        "img_size": 64,
        "window_size": 2,
    },  # fmt: skip
    "vit_medium_patch16_gap_256": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 8},
    "vit_relpos_medium_patch16_cls_224": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "img_size": 32,
        "patch_size": 8,
        "rel_pos_dim": 16,
    },  # fmt: skip
    "vit_large_patch14_clip_224": {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 28, "patch_size": 7},
}
# a timm tower whose own head is the projection (timm_proj none) emits its width: the joint space is that wide
TIMM_WIDTH = {name: sizes.get("embed_dim", 64) for name, sizes in TIMM_SIZES.items()}

# family -> (a real registry config, what shrinks it, the tokenizer stand-in or None for CLIP's BPE, the Hugging Face
# text config stand-in or None)
FAMILIES: dict[str, tuple[str, dict[str, Any], str | None, str | None]] = {
    "ViT (OpenAI/LAION CLIP)": ("ViT-B-32-quickgelu", {"vision_cfg": VIT}, None, None),
    "ViT with layer scale": ("ViT-M-16-alt", {"vision_cfg": VIT}, None, None),
    "CLIPA": ("ViT-H-14-CLIPA", {"vision_cfg": {**VIT, "head_width": 32}}, "bert", None),
    "worldwide (MetaCLIP 2)": ("ViT-H-14-worldwide", {"vision_cfg": VIT}, "xlm-r", None),
    "SigLIP": ("ViT-B-16-SigLIP", {}, "t5", None),
    "SigLIP2": ("ViT-B-16-SigLIP2", {}, "gemma", None),
    "PE-Core": ("PE-Core-B-16", {}, None, None),
    "MobileCLIP (FastViT-MCi)": ("MobileCLIP2-S0", {}, None, None),
    "MobileCLIP (ViT MCi)": ("MobileCLIP-B", {}, None, None),
    "MobileCLIP2 (timm ViT-L)": ("MobileCLIP2-L-14", {}, None, None),
    "ViTamin": ("ViTamin-S", {}, None, None),
    "ConvNeXt": ("convnext_tiny", {}, None, None),
    "EVA01": ("EVA01-g-14", {}, None, None),
    "EVA02": ("EVA02-B-16", {}, None, None),
    "Swin": ("swin_base_patch4_window7_224", {}, None, None),
    "timm ViT (GAP, rel-pos)": ("vit_relpos_medium_patch16_cls_224", {}, None, None),
    "ModifiedResNet": (
        "RN50-quickgelu",
        {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 16, "image_size": 64}},
        None,
        None,
    ),
    "CoCa": (
        "coca_ViT-B-32",
        {
            "vision_cfg": {**VIT, "attn_pooler_heads": 2, "attn_pooler_queries": 4},
            "multimodal_cfg": {**TEXT, "layers": 1, "context_length": 16},
        },
        None,
        None,
    ),  # fmt: skip
    "XLM-R text": ("xlm-roberta-base-ViT-B-32", {"vision_cfg": VIT}, "xlm-r", "xlm-roberta"),
    "mT5 text": ("mt5-base-ViT-B-32", {"vision_cfg": VIT}, "t5", "mt5"),
    "NLLB text": ("nllb-clip-base-siglip", {}, "xlm-r", "m2m_100"),
    "RoBERTa text": ("roberta-ViT-B-32", {"vision_cfg": VIT}, "xlm-r", "roberta"),
}


def shrunk_timm(name: str) -> str:
    """Register (once) and return a timm model name that builds ``name``'s architecture at :data:`TIMM_SIZES`."""
    import timm
    from timm.models import is_model, register_model

    shrunk = f"clipforge_tiny_{name}"
    if not is_model(shrunk):

        def builder(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
            return timm.create_model(name, pretrained=False, **{**TIMM_SIZES[name], **kwargs})

        builder.__name__ = shrunk
        register_model(builder)
    return shrunk


def member_config(family: str, tokenizer_folder: Path | None, hf_text_folder: Path | None) -> dict[str, Any]:
    """The family's registry config, shrunk (module docstring), its hub names pointed at the local stand-ins."""
    open_clip = pytest.importorskip("open_clip")
    name, changes, _, _ = FAMILIES[family]
    config = copy.deepcopy(open_clip.get_model_config(name))
    for section, values in changes.items():
        config[section].update(values)
    vision, text = config["vision_cfg"], config["text_cfg"]
    if vision.get("timm_model_name"):
        timm_name = vision["timm_model_name"]
        vision["timm_model_name"] = shrunk_timm(timm_name)
        vision["image_size"] = TIMM_SIZES[timm_name].get("img_size", 64)
        if vision.get("timm_proj") in ("none",):  # the trunk's features are the embeddings
            config["embed_dim"] = TIMM_WIDTH[timm_name]
    if config["embed_dim"] > 64 or "timm_model_name" not in vision:
        config["embed_dim"] = min(config["embed_dim"], 48)
    if text.get("hf_model_name"):
        text["hf_model_name"] = str(hf_text_folder)
    else:
        text.update(TEXT)
        text["context_length"] = min(text.get("context_length", 77), 16)
        if "mlp_ratio" in text:
            text["mlp_ratio"] = 4.0
    if text.get("hf_tokenizer_name"):
        text["hf_tokenizer_name"] = str(tokenizer_folder)
    if text.get("vocab_size", 49408) != 49408 and tokenizer_folder is not None:
        from transformers import AutoTokenizer

        text["vocab_size"] = len(AutoTokenizer.from_pretrained(tokenizer_folder))
    return config


def write_member(folder: Path, family: str, preprocess_cfg: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """The family's small member as open_clip's ``local-dir:`` folder (module docstring); returns the folder."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    _, _, tokenizer_kind, hf_kind = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_kind is not None:
        write_tokenizer(folder, tokenizer_kind)
    # beside the model folder, as a hub id is beside a repository: removing the folder leaves what open_clip reads
    hf_text = write_hf_text_config(folder.parent / f"{folder.name}-hf-text", hf_kind, folder) if hf_kind else None
    config = member_config(family, folder if tokenizer_kind else None, hf_text)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess_cfg or {}}), encoding="utf-8"
    )
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False).eval()
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


# ----------------------------------------------------------------------------------------------
# Stand-ins for the hub
# ----------------------------------------------------------------------------------------------
def _unigram_pieces(**ids: int) -> list[tuple[str, float]]:
    sentencepiece = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_writer=model, vocab_size=64, hard_vocab_limit=False,
        model_type="unigram", minloglevel=2, **ids,
    )  # fmt: skip
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def write_tokenizer(folder: Path, kind: str) -> Path:
    """A tiny Hugging Face tokenizer of ``kind`` (``t5``, ``gemma``, ``xlm-r``, ``bert``) saved into ``folder``."""
    from transformers import BertTokenizer, GemmaTokenizer, T5Tokenizer, XLMRobertaTokenizer

    if kind == "t5":  # pad 0, </s> 1, <unk> 2: SigLIP's and mT5's layout
        tokenizer = T5Tokenizer(vocab=_unigram_pieces(pad_id=0, eos_id=1, unk_id=2, bos_id=-1), extra_ids=0)
    elif kind == "xlm-r":  # <s> 0, <pad> 1, </s> 2, <unk> 3
        pieces = _unigram_pieces(unk_id=0, pad_id=-1, bos_id=-1, eos_id=-1)
        tokenizer = XLMRobertaTokenizer(vocab=[("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), *pieces])
    elif kind == "bert":
        tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
        tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(tokens)})
    elif kind == "gemma":  # <pad> 0, <eos> 1, <bos> 2, <unk> 3; no <bos>, <eos> appended: SigLIP2's use of it
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.Metaspace()
        special = ["<pad>", "<eos>", "<bos>", "<unk>"]
        bpe.train_from_iterator(
            SENTENCES, trainers.BpeTrainer(vocab_size=80, special_tokens=special, show_progress=False)
        )
        model = json.loads(bpe.to_str())["model"]
        merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split()) for pair in model["merges"]]
        tokenizer = GemmaTokenizer(
            vocab=model["vocab"], merges=merges, add_bos_token=False, add_eos_token=True, padding_side="right"
        )
    else:
        raise ValueError(kind)
    tokenizer.save_pretrained(folder)
    return folder


def write_hf_text_config(folder: Path, model_type: str, tokenizer_folder: Path) -> Path:
    """A 2-layer random config of ``model_type`` whose vocabulary and pad id are the stand-in tokenizer's."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    sizes = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if model_type == "mt5":
        sizes.update(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)
    elif model_type == "m2m_100":
        sizes.update(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)  # fmt: skip
    else:
        sizes.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64)  # fmt: skip
    AutoConfig.for_model(model_type, **sizes).save_pretrained(folder)
    return folder
