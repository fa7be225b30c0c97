"""``clipforge export hf``: a folder transformers loads with the same outputs; import -> export is lossless; what has
no counterpart is refused; clipforge's BPE (``<eos>`` at id 2, which transformers' CLIP reads as "pool at argmax")
exports with ``<eos>`` renumbered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge import from_pretrained, load_checkpoint
from clipforge.checkpoint import Checkpoint, save_checkpoint
from clipforge.cli import main
from clipforge.config import config_from_dict
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.model.factory import build_model, make_processor
from tests.interop.tiny_models import (
    CAPTIONS,
    CONTEXT_LENGTH,
    WORDS,
    image_batch,
    write_hf_clip,
    write_hf_siglip,
    write_trained_style_checkpoint,
)

transformers = pytest.importorskip("transformers")

FAMILIES = {"clip": (write_hf_clip, "CLIPModel"), "siglip": (write_hf_siglip, "SiglipModel")}


def export(checkpoint: Path, out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["export", "hf", "--checkpoint", str(checkpoint), "--out", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_then_export_is_lossless(family: str, tmp_path: Path, capsys) -> None:
    write, class_name = FAMILIES[family]
    folder = write(tmp_path / "released")
    checkpoint = tmp_path / "imported.pt"
    assert main(["import", f"hf:{folder}", "--out", str(checkpoint)]) == 0
    out = tmp_path / "exported"
    code, err = export(checkpoint, out, capsys)
    assert code == 0, err

    model_class = getattr(transformers, class_name)
    released, exported = model_class.from_pretrained(folder), model_class.from_pretrained(out)
    released_state, exported_state = released.state_dict(), exported.state_dict()
    assert set(released_state) == set(exported_state)
    for key, tensor in released_state.items():
        assert torch.equal(tensor, exported_state[key]), key
    # and the folder comes back through from_pretrained as the same model
    again, original = from_pretrained(f"hf:{out}"), load_checkpoint(checkpoint)
    again.config.model.text.tokenizer.name = original.config.model.text.tokenizer.name  # where each came from
    assert again.config.model == original.config.model
    ids, mask = original.tokenizer(CAPTIONS, CONTEXT_LENGTH)
    assert torch.equal(again.tokenizer(CAPTIONS, CONTEXT_LENGTH)[0], ids)
    with torch.no_grad():
        assert torch.equal(
            again.model(image_batch(), ids, mask).image_embeds,
            original.model(image_batch(), ids, mask).image_embeds,
        )
        assert torch.equal(again.model.encode_text(ids, mask), original.model.encode_text(ids, mask))
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == pytest.approx(original.config.model.image.mean)


def test_a_bpe_model_exports_with_eos_renumbered_and_transformers_agrees(tmp_path: Path, capsys) -> None:
    checkpoint, tokenizer = write_trained_style_checkpoint(tmp_path)
    assert tokenizer.eos_token_id == 2  # the pitfall: transformers would pool at argmax(input_ids)
    out = tmp_path / "hf"
    code, err = export(checkpoint, out, capsys)
    assert code == 0, err
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    assert text_config["eos_token_id"] == tokenizer.vocab_size - 1 != 2

    loaded = load_checkpoint(checkpoint)
    hf_model = transformers.CLIPModel.from_pretrained(out).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = hf_tokenizer(CAPTIONS, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
    ids, mask = loaded.tokenizer(CAPTIONS, CONTEXT_LENGTH)  # one caption is longer: both keep <eos> last
    renumbered = torch.where(
        ids == 2, text_config["eos_token_id"], torch.where(ids == text_config["eos_token_id"], 2, ids)
    )
    assert torch.equal(encoded["input_ids"], renumbered) and torch.equal(encoded["attention_mask"], mask)
    pixels = image_batch()
    with torch.no_grad():
        output = hf_model(**encoded, pixel_values=pixels)
        ours = loaded.model(pixels, ids, mask)
        logits = loaded.model.generate_similarity_matrix(pixels, ids, mask)
    assert (F.normalize(output.text_embeds, dim=-1) - ours.text_embeds).abs().max() < 1e-5
    assert (F.normalize(output.image_embeds, dim=-1) - ours.image_embeds).abs().max() < 1e-5
    assert (output.logits_per_image - logits).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"image": {"head": "mlp"}}, "the image head (model.image.head='mlp') has no Hugging Face counterpart"),
        (
            {"siglip": True},
            "the logit bias (loss.kind=siglip) of a model with CLIP's towers has no Hugging Face counterpart",
        ),
        ({"text": {"pooling": "mean"}}, "model.text.pooling='mean' has no Hugging Face counterpart"),
    ],
)
def test_a_model_without_a_counterpart_is_refused(changes: dict, expected: str, tmp_path: Path, capsys) -> None:
    checkpoint, _ = write_trained_style_checkpoint(tmp_path, **changes)
    out = tmp_path / "hf"
    code, err = export(checkpoint, out, capsys)
    assert code == 2 and expected in err and "clipforge export onnx" in err and "Traceback" not in err
    assert not out.exists()


def test_a_timm_image_tower_is_refused(tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    values = {
        "model": {
            "embed_dim": 32,
            "image": {"kind": "timm", "name": "resnet10t", "image_size": 32},
            "text": {"width": 32, "depth": 1, "heads": 2, "context_length": CONTEXT_LENGTH},
        }
    }
    config = config_from_dict(values)
    tokenizer = train_bpe_tokenizer(WORDS * 2, 300)
    model = build_model(config, tokenizer, pretrained=False)
    checkpoint = tmp_path / "timm.pt"
    save_checkpoint(checkpoint, Checkpoint(config, make_processor(config.model, tokenizer), model.state_dict()))
    code, err = export(checkpoint, tmp_path / "hf", capsys)
    assert code == 2 and "the image tower (model.image.kind='timm')" in err and "clipforge export onnx" in err


def test_an_existing_folder_is_not_overwritten(tmp_path: Path, capsys) -> None:
    checkpoint, _ = write_trained_style_checkpoint(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("keep me")
    code, err = export(checkpoint, out, capsys)
    assert code == 2 and "is not an empty folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and (out / "config.json").read_text() == "keep me"
