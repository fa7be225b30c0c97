"""Every family of open_clip's registry, one small member each (``tests/interop/zoo_models.py``: the family's real
config, shrunk; random weights; hub names replaced by local stand-ins), through each framework's own pipeline.

For each family the test checks, on two real photographs that are not square (640 x 427 and 427 x 640):

1. import: clipforge's embeddings (its Processor: resize, crop, normalization, tokenizer) equal open_clip's (its own
   ``create_model_and_transforms("local-dir:...")`` transform and ``get_tokenizer``) within 1e-5, and the token ids
   are open_clip's;
2. checkpoint: the clipforge checkpoint rebuilds the same model with the released folder deleted (the hosted
   towers' configs, a Hugging Face text config and the tokenizer travel in it);
3. export: ``clipforge export open_clip`` of that checkpoint, loaded back by open_clip (``local-dir:``, its own
   transform and tokenizer again), gives clipforge's embeddings within 1e-5.

A registry name at full size (``open_clip:NAME``, ``NAME:WEIGHTS``) and the export loaded as
``create_model_and_transforms(NAME, pretrained=...)`` are checked on the smallest registry model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clipforge import from_pretrained
from clipforge.interop.load import save_imported_checkpoint
from clipforge.interop.open_clip.export import export_open_clip
from clipforge.model.factory import LoadedModel
from tests.interop.tiny_models import photos
from tests.interop.zoo_models import CAPTIONS, FAMILIES, write_member

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("sentencepiece", reason="the tokenizer stand-ins are SentencePiece models trained here")

EXACT = 1e-5
SIGLIP_PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash", "interpolation": "bicubic"}
# a hub repository's own preprocessing, where the family's released models have one unlike open_clip's defaults
PREPROCESS = {
    "SigLIP": SIGLIP_PREPROCESS,
    "SigLIP2": SIGLIP_PREPROCESS,
    "NLLB text": SIGLIP_PREPROCESS,
    "ModifiedResNet": {"interpolation": "bilinear"},
    "CLIPA": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
CONVERTED_FAMILIES = ("ViT (OpenAI/LAION CLIP)", "worldwide (MetaCLIP 2)")  # the rest host a tower or two


def open_clip_side(source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings, text embeddings, token ids) by open_clip's own model, transform and tokenizer."""
    model, _, preprocess = open_clip.create_model_and_transforms(source, pretrained_text=False)
    tokenizer = open_clip.get_tokenizer(source)
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        images = model.eval().encode_image(torch.stack([preprocess(photo) for photo in photos()]), normalize=True)
        texts = model.encode_text(ids, normalize=True)
    return images, texts, ids


def clipforge_side(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image embeddings, text embeddings, token ids) through clipforge's Processor."""
    batch = loaded.processor(images=photos(), text=CAPTIONS)
    with torch.no_grad():
        output = loaded.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    return output.image_embeds, output.text_embeds, batch["input_ids"]


def assert_same(ours: tuple, theirs: tuple) -> None:
    assert (ours[0] - theirs[0]).abs().max() < EXACT
    assert (ours[1] - theirs[1]).abs().max() < EXACT


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_member_matches_open_clip_survives_a_checkpoint_and_exports_back(family: str, tmp_path: Path) -> None:
    folder = write_member(tmp_path / "released", family, PREPROCESS.get(family))
    theirs = open_clip_side(f"local-dir:{folder}")
    loaded = from_pretrained(f"open_clip:local-dir:{folder}")
    ours = clipforge_side(loaded)
    length = ours[2].shape[1]
    assert torch.equal(ours[2], theirs[2][:, :length])  # open_clip's ids; it pads further, with its pad id
    assert (theirs[2][:, length:] == loaded.tokenizer.pad_token_id).all()
    assert_same(ours, theirs)
    kinds = {loaded.config.model.image.kind, loaded.config.model.text.kind}
    assert ("open_clip" in kinds) == (family not in CONVERTED_FAMILIES)

    checkpoint = save_imported_checkpoint(loaded, tmp_path / "model.pt", f"open_clip:local-dir:{folder}")
    shutil.rmtree(folder)  # the checkpoint alone rebuilds it, offline
    rebuilt = from_pretrained(checkpoint)
    again = clipforge_side(rebuilt)
    assert torch.equal(again[2], ours[2])
    assert (again[0] - ours[0]).abs().max() < 1e-6 and (again[1] - ours[1]).abs().max() < 1e-6

    exported = export_open_clip(rebuilt, tmp_path / "exported")
    assert exported.max_difference < EXACT
    assert_same(again, open_clip_side(f"local-dir:{exported.folder}"))


def test_a_registry_name_is_open_clip_random_model_and_exports_to_its_name(tmp_path: Path) -> None:
    """``open_clip:NAME`` (no network: open_clip's own random init), ``NAME:WEIGHTS``, and the export loaded as
    ``create_model_and_transforms(NAME, pretrained=FILE)``, on the registry's smallest model (43M parameters)."""
    name = "ViT-S-32-alt"
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    torch.manual_seed(0)
    loaded = from_pretrained(f"open_clip:{name}")
    ours = clipforge_side(loaded)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        pixels = torch.stack([preprocess(photo) for photo in photos()])
        theirs = (model.eval().encode_image(pixels, True), model.encode_text(tokenizer(CAPTIONS), True))
    assert_same(ours, theirs)

    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    assert_same(clipforge_side(from_pretrained(f"open_clip:{name}:{weights}")), theirs)

    exported = export_open_clip(loaded, tmp_path / "exported")
    reloaded, _, _ = open_clip.create_model_and_transforms(
        name, pretrained=str(exported.folder / "open_clip_model.safetensors")
    )
    with torch.no_grad():
        assert (reloaded.eval().encode_image(pixels, True) - ours[0]).abs().max() < EXACT
