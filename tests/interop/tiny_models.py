"""Tiny released-format models written on the fly (2 layers, width 64, 8 px patches, 32 px images), offline.

* :func:`write_hf_clip`: a random ``CLIPModel`` saved with ``save_pretrained``, CLIP's real BPE tokenizer (its
  ``vocab.json`` / ``merges.txt`` built from the merges file open_clip ships) and a ``CLIPImageProcessor``;
* :func:`write_hf_siglip`: a random ``SiglipModel`` with a SentencePiece tokenizer trained here on the shapes
  vocabulary, and a ``SiglipImageProcessor``;
* :func:`write_open_clip`: a random open_clip ViT model from ``open_clip.create_model`` with a custom config;
  :func:`write_open_clip_folder`: the same as a hub-style folder (``open_clip_config.json`` with its
  ``preprocess_cfg``, ``open_clip_model.safetensors``) that ``open_clip.create_model_and_transforms("local-dir:...")``
  loads;
* :func:`write_hf_siglip2` (NaFlex, 16 px patches), :func:`write_hf_siglip2_fixed` (a ``SiglipModel`` with Gemma's
  tokenizer), :func:`write_hf_metaclip_2`, :func:`write_hf_chinese_clip`, :func:`write_hf_altclip`: the other Hugging
  Face model types, each with its own kind of tokenizer built here (:func:`write_gemma_tokenizer`,
  :func:`write_xlmr_tokenizer`, :func:`write_bert_tokenizer`) and its image processor;
* :func:`write_trained_style_checkpoint`: a clipforge checkpoint as ``clipforge train`` builds it;
* :func:`photos`: two real photographs, 640 x 427 and 427 x 640 (scikit-learn's sample images, shipped offline).
"""

from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

TOWER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION = {**TOWER, "image_size": 32, "patch_size": 8}
CONTEXT_LENGTH = 16
CAPTIONS = ["a small red circle", "two large blue squares, side by side", "x", "a photo of a green triangle"]
WORDS = "a an the of photo small large red green blue yellow circle square squares triangle two side by x".split()
# a logit scale no clipforge run starts from (CLIP starts at log(1 / 0.07) = 2.66): a run that kept it was
# initialized from the import
IMPORTED_LOG_LOGIT_SCALE = math.log(30.0)


@functools.cache
def _sample_images() -> tuple:
    datasets = pytest.importorskip("sklearn.datasets", reason="the sample photographs ship with scikit-learn")
    return tuple(datasets.load_sample_images().images)  # china.jpg, flower.jpg: (427, 640, 3) uint8


def photos() -> list:
    """Two photographs, landscape 640 x 427 and portrait 427 x 640 (PIL RGB): resized to a tiny model's 32 px, the
    long side is 47 px and the crop offset 7.5, where torchvision's rounding (8) and transformers' (7) part."""
    from PIL import Image

    china, flower = _sample_images()
    return [Image.fromarray(china), Image.fromarray(flower).transpose(Image.Transpose.TRANSPOSE)]


def image_batch(size: int = 32, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def pooled(output: Any) -> torch.Tensor:
    """``get_*_features``' tensor (transformers 5 returns a ModelOutput with ``pooler_output``, 4.x the tensor)."""
    return getattr(output, "pooler_output", output)


def write_hf_clip(folder: Path, eos_token_id: int | None = None, seed: int = 0) -> Path:
    """A tiny random CLIPModel folder; ``eos_token_id=2`` writes an old config (transformers pools at argmax)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from clipforge.interop.clip_bpe import write_clip_bpe_files

    folder.mkdir(parents=True, exist_ok=True)
    text = {**TOWER, "max_position_embeddings": CONTEXT_LENGTH}
    if eos_token_id is not None:
        text["eos_token_id"] = eos_token_id
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=32))
    with torch.no_grad():
        model.logit_scale.fill_(IMPORTED_LOG_LOGIT_SCALE)
    model.save_pretrained(folder)
    write_clip_bpe_files(folder)
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
        resample=2,  # bilinear: not the family's default, so the test sees it read
    ).save_pretrained(folder)
    return folder


def write_sentencepiece(folder: Path) -> Path:
    """A tiny unigram SentencePiece model over the shapes vocabulary (pad 0, ``</s>`` 1, ``<unk>`` 2)."""
    sentencepiece = pytest.importorskip("sentencepiece", reason="SigLIP's tokenizer is SentencePiece")
    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=64,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def write_hf_siglip(folder: Path, seed: int = 0) -> Path:
    """A tiny random SiglipModel folder with its SentencePiece tokenizer and image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    # as Google's released SigLIP tokenizers: input_ids are the only model input (SigLIP reads no padding mask)
    tokenizer = SiglipTokenizer(
        vocab_file=str(write_sentencepiece(folder)), model_max_length=CONTEXT_LENGTH, model_input_names=["input_ids"]
    )
    tokenizer.save_pretrained(folder)
    text = {**TOWER, "max_position_embeddings": CONTEXT_LENGTH, "vocab_size": len(tokenizer)}
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


OPEN_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_open_clip(folder: Path, config: dict | None = None, name: str = "tiny-vit") -> tuple[Path, Path, Any]:
    """``(config path, weights path, the open_clip model)`` of a tiny random open_clip ViT model."""
    open_clip = pytest.importorskip("open_clip")
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(config or OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    model = open_clip.create_model(name).eval()
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return config_path, weights, model


def write_open_clip_folder(
    folder: Path, preprocess_cfg: dict, config: dict | None = None, name: str = "tiny-folder"
) -> tuple[Path, Path]:
    """``(open_clip_config.json, open_clip_model.safetensors)``: a tiny open_clip model as a hub repository holds it,
    with its ``preprocess_cfg``; ``open_clip.create_model_and_transforms(f"local-dir:{folder}")`` loads both."""
    from safetensors.torch import save_file

    _, weights, model = write_open_clip(folder / "source", config, name=name)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "open_clip_config.json"
    config_path.write_text(json.dumps({"model_cfg": config or OPEN_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg}))
    weights = folder / "open_clip_model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    return config_path, weights


def write_trained_style_checkpoint(folder: Path, siglip: bool = False, **model_changes) -> tuple[Path, object]:
    """A clipforge model as ``clipforge train`` builds it (built-in towers, a BPE whose ``<eos>`` is id 2)."""
    from clipforge.checkpoint import Checkpoint, save_checkpoint
    from clipforge.config import config_from_dict
    from clipforge.data.tokenize import train_bpe_tokenizer
    from clipforge.model.factory import build_model, make_processor

    values = {
        "embed_dim": 32,
        "image": {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2},
        "text": {"width": 48, "depth": 2, "heads": 2, "context_length": CONTEXT_LENGTH},
    }
    for section, changes in model_changes.items():
        values[section].update(changes)
    loss = "siglip" if siglip else "clip"
    config = config_from_dict({"model": values, "loss": {"kind": loss}})
    tokenizer = train_bpe_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 2, 300)
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    path = folder / "model.pt"
    save_checkpoint(path, Checkpoint(config, make_processor(config.model, tokenizer), model.state_dict()))
    return path, tokenizer


# ----------------------------------------------------------------------------------------------
# The other Hugging Face model types: SigLIP 2 (NaFlex and fixed resolution), MetaCLIP 2, Chinese-CLIP, AltCLIP
# ----------------------------------------------------------------------------------------------
SIGLIP2_CONTEXT = 64  # Siglip2Processor pads to 64 tokens by default, as the released models read
# Siglip2Processor's own defaults (it passes them to its image processor whatever that one's config says): a photo
# becomes a 13 x 19 grid of 16 px patches, and the 4 x 4 position table is resized to it
NAFLEX_PATCH, NAFLEX_PATCHES = 16, 256
CJK_WORDS = "一 只 猫 狗 的 照 片 红 色 圆".split()
# captions in each tokenizer's languages, with capitals (SigLIP 2's tokenizer lower-cases) and repeated words
MULTILINGUAL_CAPTIONS = ["A photo of two RED squares", "x", "一只猫的照片", "the large blue circle, side by side"]


def write_gemma_tokenizer(folder: Path, max_length: int = SIGLIP2_CONTEXT) -> Any:
    """A tiny byte-fallback BPE in Gemma's layout (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3), trained here,
    saved as SigLIP 2's released tokenizers are: no ``<bos>``, ``<eos>`` added, right padding, ``input_ids`` the only
    model input."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    backend.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split()) for merge in model["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=model["vocab"],
        merges=merges,
        add_bos_token=False,
        add_eos_token=True,
        padding_side="right",
        model_input_names=["input_ids"],
        model_max_length=max_length,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_xlmr_tokenizer(folder: Path) -> Any:
    """A tiny XLM-R (unigram) tokenizer: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the words, letters."""
    from transformers import XLMRobertaTokenizer

    letters = sorted(set("".join(WORDS)))
    pieces = [(f"▁{word}", -1.0) for word in WORDS] + [(letter, -5.0) for letter in letters] + [("▁", -3.0)]
    pieces += [(word, -2.0) for word in CJK_WORDS] + [(",", -4.0)]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=CONTEXT_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_bert_tokenizer(folder: Path) -> Any:
    """A tiny uncased WordPiece in BERT's layout, Chinese characters split one by one (Chinese-CLIP's)."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *CJK_WORDS, ",", *sorted(set("".join(WORDS)))]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))})
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.save_pretrained(folder)
    return tokenizer


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def write_hf_siglip2(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``Siglip2Model`` (NaFlex): Gemma's tokenizer and a ``Siglip2ImageProcessor`` of 16 px patches."""
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_gemma_tokenizer(folder)
    text = {
        **TOWER,
        "max_position_embeddings": SIGLIP2_CONTEXT,
        "vocab_size": len(tokenizer),
        **_special_ids(tokenizer),
    }
    vision = {**TOWER, "patch_size": NAFLEX_PATCH, "num_patches": 16}
    torch.manual_seed(seed)
    Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=NAFLEX_PATCH, max_num_patches=NAFLEX_PATCHES).save_pretrained(folder)
    return folder


def write_hf_siglip2_fixed(folder: Path, seed: int = 0) -> Path:
    """A tiny SigLIP 2 model of fixed resolution, as released: a ``SiglipModel`` with Gemma's tokenizer."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_gemma_tokenizer(folder)
    text = {
        **TOWER,
        "max_position_embeddings": SIGLIP2_CONTEXT,
        "vocab_size": len(tokenizer),
        **_special_ids(tokenizer),
    }
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)).save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_hf_metaclip_2(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``MetaClip2Model``: XLM-R's tokenizer (``</s>`` = 2, where it pools) and CLIP's processor."""
    from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_xlmr_tokenizer(folder)
    text = {**TOWER, "max_position_embeddings": CONTEXT_LENGTH, "vocab_size": len(tokenizer), **_special_ids(tokenizer)}
    torch.manual_seed(seed)
    model = MetaClip2Model(MetaClip2Config(text_config=text, vision_config=VISION, projection_dim=32))
    with torch.no_grad():
        model.logit_scale.fill_(IMPORTED_LOG_LOGIT_SCALE)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def write_hf_chinese_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``ChineseCLIPModel``: a BERT text model, BERT's tokenizer, and Chinese-CLIP's released resize (the
    whole image to the square, no crop)."""
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_bert_tokenizer(folder)
    text = {**TOWER, "max_position_embeddings": 64, "vocab_size": len(tokenizer), "pad_token_id": 0}
    torch.manual_seed(seed)
    ChineseCLIPModel(ChineseCLIPConfig(text_config=text, vision_config=VISION, projection_dim=32)).save_pretrained(
        folder
    )
    size = {"height": 32, "width": 32}
    ChineseCLIPImageProcessor(size=size, crop_size=size, do_center_crop=False).save_pretrained(folder)
    return folder


def write_hf_altclip(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``AltCLIPModel``: an XLM-R text model projecting every token to 48, XLM-R's tokenizer."""
    from transformers import AltCLIPConfig, AltCLIPModel, CLIPImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_xlmr_tokenizer(folder)
    text = {**TOWER, "max_position_embeddings": CONTEXT_LENGTH + 2, "vocab_size": len(tokenizer), "project_dim": 48}
    text.update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    text.update(eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    AltCLIPModel(AltCLIPConfig(text_config=text, vision_config=VISION, projection_dim=32)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
