"""Every Hugging Face model type, both ways, through each framework's own pipeline: a tiny random model of each type
(``clip``, ``siglip``, SigLIP 2 NaFlex and fixed resolution, ``metaclip_2``, ``chinese_clip``, ``altclip``) with its
own kind of tokenizer, built offline, and two photographs that are not square.

transformers' side is what its documentation does: ``AutoProcessor.from_pretrained(folder)(images=..., text=...)``
into ``AutoModel.from_pretrained(folder)``; clipforge's side is the imported model's ``Processor`` into its model.
The same after ``clipforge export hf`` (the export folder's own processor), and the export is lossless and portable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge import from_pretrained, load_checkpoint
from clipforge.cli import main
from clipforge.data.processor import MACHINE_LOCAL_KEYS
from tests.interop.tiny_models import (
    MULTILINGUAL_CAPTIONS,
    photos,
    write_hf_altclip,
    write_hf_chinese_clip,
    write_hf_clip,
    write_hf_metaclip_2,
    write_hf_siglip,
    write_hf_siglip2,
    write_hf_siglip2_fixed,
)

transformers = pytest.importorskip("transformers")

EXACT = 1e-5
# name -> (writer, transformers class, converted or hosted (image, text))
TYPES = {
    "clip": (write_hf_clip, "CLIPModel", ("vit", "transformer")),
    "siglip": (write_hf_siglip, "SiglipModel", ("vit", "transformer")),
    "siglip2": (write_hf_siglip2, "Siglip2Model", ("naflex", "transformer")),
    "siglip2-fixed": (write_hf_siglip2_fixed, "SiglipModel", ("vit", "transformer")),
    "metaclip_2": (write_hf_metaclip_2, "MetaClip2Model", ("vit", "transformer")),
    "chinese_clip": (write_hf_chinese_clip, "ChineseCLIPModel", ("vit", "hf")),
    "altclip": (write_hf_altclip, "AltCLIPModel", ("vit", "hf")),
}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: write(root / name) for name, (write, _, _) in TYPES.items()}


def transformers_outputs(folder: Path, context_length: int, captions=MULTILINGUAL_CAPTIONS):
    """transformers' own pipeline on the photographs and captions: its processor, then its model."""
    processor = transformers.AutoProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    # SigLIP's documented call pads every text to the full length; the others pad to the batch's longest
    padding = "max_length" if "siglip" in model.config.model_type else True
    text = {"padding": padding, "truncation": True, "max_length": context_length}
    inputs = processor(images=photos(), text=captions, return_tensors="pt", **text)
    with torch.no_grad():
        return inputs, model(**inputs)


def clipforge_outputs(loaded, captions=MULTILINGUAL_CAPTIONS):
    inputs = loaded.processor(images=photos(), text=captions)
    with torch.no_grad():
        output = loaded.model.float().eval()(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    return inputs, output


def assert_same_outputs(theirs, ours) -> None:
    """Embeddings (unit norm) within 1e-5; logits within 1e-5 of their magnitude."""
    assert (F.normalize(theirs.image_embeds, dim=-1) - ours.image_embeds).abs().max() < EXACT
    assert (F.normalize(theirs.text_embeds, dim=-1) - ours.text_embeds).abs().max() < EXACT
    logits = ours.logits_per_image.detach()
    assert (theirs.logits_per_image - logits).abs().max() < EXACT * max(1.0, float(logits.abs().max()))


@pytest.mark.parametrize("name", sorted(TYPES))
def test_an_import_equals_transformers_through_its_own_processor(name: str, released: dict[str, Path]) -> None:
    _, class_name, (image_kind, text_kind) = TYPES[name]
    loaded = from_pretrained(f"hf:{released[name]}")
    model = loaded.config.model
    assert (model.image.kind, model.text.kind) == (image_kind, text_kind)  # converted or hosted, as documented
    their_inputs, theirs = transformers_outputs(released[name], loaded.processor.context_length)
    assert type(transformers.AutoModel.from_pretrained(released[name])).__name__ == class_name
    our_inputs, ours = clipforge_outputs(loaded)
    assert torch.equal(our_inputs["input_ids"], their_inputs["input_ids"])  # the folder's own tokenizer, its ids
    assert_same_outputs(theirs, ours)


def test_siglip2_tokenizer_lower_cases_and_survives_the_checkpoint(released: dict[str, Path], tmp_path: Path) -> None:
    """transformers loads a siglip2 folder's Gemma tokenizer as Siglip2Tokenizer, which lower-cases; the checkpoint
    keeps that tokenizer, not the plain Gemma one its files name."""
    checkpoint = tmp_path / "siglip2.pt"
    assert main(["import", f"hf:{released['siglip2']}", "--out", str(checkpoint)]) == 0
    processor = load_checkpoint(checkpoint).processor
    upper, lower = processor.text(["A RED Circle"]), processor.text(["a red circle"])
    assert torch.equal(upper["input_ids"], lower["input_ids"])
    expected = transformers.AutoTokenizer.from_pretrained(released["siglip2"])(
        MULTILINGUAL_CAPTIONS, padding="max_length", max_length=processor.context_length, return_tensors="pt"
    )
    assert torch.equal(processor.text(MULTILINGUAL_CAPTIONS)["input_ids"], expected["input_ids"])
    # the fixed-resolution SigLIP 2 folder names the same Gemma tokenizer under model_type siglip: no lower-casing
    fixed = from_pretrained(f"hf:{released['siglip2-fixed']}").processor
    assert not torch.equal(fixed.text(["A RED Circle"])["input_ids"], fixed.text(["a red circle"])["input_ids"])


@pytest.mark.parametrize("name", sorted(TYPES))
def test_export_hf_round_trips_through_transformers_own_pipeline(
    name: str, released: dict[str, Path], tmp_path: Path
) -> None:
    _, class_name, _ = TYPES[name]
    checkpoint, out = tmp_path / "imported.pt", tmp_path / "exported"
    assert main(["import", f"hf:{released[name]}", "--out", str(checkpoint)]) == 0
    assert main(["export", "hf", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    exported = transformers.AutoModel.from_pretrained(out)
    assert type(exported).__name__ == class_name
    # lossless: every tensor of the released model, unchanged
    source = transformers.AutoModel.from_pretrained(released[name]).state_dict()
    assert set(exported.state_dict()) == set(source)
    for key, tensor in source.items():
        assert torch.equal(exported.state_dict()[key], tensor), key

    loaded = load_checkpoint(checkpoint)
    their_inputs, theirs = transformers_outputs(out, loaded.processor.context_length)
    our_inputs, ours = clipforge_outputs(loaded)
    assert torch.equal(our_inputs["input_ids"], their_inputs["input_ids"])
    assert_same_outputs(theirs, ours)

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == loaded.processor.context_length
    assert not MACHINE_LOCAL_KEYS & set(config), config
    assert not [value for value in config.values() if isinstance(value, str) and os.path.isabs(value)], config
    # and the export imports back as the same model
    again = from_pretrained(f"hf:{out}").config.model
    original = loaded.config.model
    for section in (again.text, original.text):
        section.name = section.tokenizer.name = ""  # where each came from
    assert again == original


def test_a_text_model_without_a_two_tower_type_is_refused_by_export_hf(tmp_path: Path, capsys) -> None:
    """A CLIP ViT with a hosted BERT (as a user may train it) has no transformers two-tower class: refused, naming
    the text model's type and the ONNX export."""
    from clipforge.checkpoint import Checkpoint, save_checkpoint
    from clipforge.config import config_from_dict
    from clipforge.data.tokenize import load_hf_tokenizer
    from clipforge.model.factory import build_model, hf_text_config, make_processor
    from tests.interop.tiny_models import VISION, write_bert_tokenizer

    folder = tmp_path / "bert"
    write_bert_tokenizer(folder)
    bert = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(bert).save_pretrained(folder)
    image = {"image_size": VISION["image_size"], "patch_size": VISION["patch_size"], "width": 32, "depth": 1}
    text = {"kind": "hf", "name": str(folder), "pretrained": False, "context_length": 16, "tokenizer": {"kind": "hf"}}
    config = config_from_dict({"model": {"embed_dim": 32, "image": {**image, "heads": 2}, "text": text}})
    tokenizer = load_hf_tokenizer(str(folder))
    model = build_model(config, tokenizer)
    checkpoint = tmp_path / "bert.pt"
    processor = make_processor(config.model, tokenizer)
    save_checkpoint(checkpoint, Checkpoint(config, processor, model.state_dict(), hf_text_config=hf_text_config(model)))
    capsys.readouterr()
    assert main(["export", "hf", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'bert'" in err and "no Hugging Face counterpart" in err and "clipforge export onnx" in err
    assert not (tmp_path / "out").exists()
