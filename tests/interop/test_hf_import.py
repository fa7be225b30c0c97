"""Importing Hugging Face CLIP and SigLIP models: the same embeddings and logits as transformers, the same token
ids, the preprocessing in the config, an ordinary checkpoint from ``clipforge import``, and errors that teach."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipforge import from_pretrained, load_checkpoint
from clipforge.cli import main
from tests.interop.tiny_models import CAPTIONS, CONTEXT_LENGTH, image_batch, pooled, write_hf_clip, write_hf_siglip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_clip(tmp_path_factory.mktemp("hf") / "clip")


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_siglip(tmp_path_factory.mktemp("hf") / "siglip")


def assert_matches_transformers(folder: Path, model_class, siglip: bool) -> None:
    """Image and text embeddings (normalized) and logits of the import equal transformers' within 1e-5."""
    hf_model = model_class.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    loaded = from_pretrained(f"hf:{folder}")
    padding = "max_length" if siglip else True
    encoded = hf_tokenizer(CAPTIONS, padding=padding, max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt")
    # SigLIP was trained without a padding mask; CLIP's causal mask keeps padding out either way
    text_inputs = {"input_ids": encoded["input_ids"]}
    if not siglip:
        text_inputs["attention_mask"] = encoded["attention_mask"]
    ids, mask = loaded.tokenizer(CAPTIONS, CONTEXT_LENGTH)
    assert torch.equal(ids, encoded["input_ids"])
    pixels = image_batch()
    with torch.no_grad():
        image_expected = F.normalize(pooled(hf_model.get_image_features(pixel_values=pixels)), dim=-1)
        text_expected = F.normalize(pooled(hf_model.get_text_features(**text_inputs)), dim=-1)
        logits_expected = hf_model(pixel_values=pixels, **text_inputs).logits_per_image
        output = loaded.model(pixels, ids, mask)
        logits = loaded.model.generate_similarity_matrix(pixels, ids, mask)
    assert (output.image_embeds - image_expected).abs().max() < 1e-5
    assert (output.text_embeds - text_expected).abs().max() < 1e-5
    assert (logits - logits_expected).abs().max() < 1e-5


def test_an_imported_clip_model_matches_transformers(hf_clip: Path) -> None:
    assert_matches_transformers(hf_clip, transformers.CLIPModel, siglip=False)
    text = from_pretrained(f"hf:{hf_clip}").config.model.text
    assert (text.pooling, text.eos_token_id, text.act, text.causal) == ("eos", 49407, "quick_gelu", True)


def test_an_imported_siglip_model_matches_transformers(hf_siglip: Path) -> None:
    assert_matches_transformers(hf_siglip, transformers.SiglipModel, siglip=True)
    loaded = from_pretrained(f"hf:{hf_siglip}")
    model = loaded.config.model
    assert (model.image.pool, model.image.pre_norm, model.image.patch_bias, model.image.head) == (
        "map",
        False,
        True,
        "identity",
    )
    assert (model.text.causal, model.text.pooling, model.text.head_bias, model.text.act) == (
        False,
        "last",
        True,
        "gelu_tanh",
    )
    assert loaded.config.loss.kind == "siglip" and loaded.model.logit_bias is not None
    assert model.text.tokenizer.padding == "max_length"
    assert loaded.tokenizer(["a"], CONTEXT_LENGTH)[0].shape == (1, CONTEXT_LENGTH)  # padded to the full length


def test_an_old_clip_config_with_eos_id_2_pools_at_argmax_as_transformers_does(tmp_path: Path) -> None:
    folder = write_hf_clip(tmp_path / "old-clip", eos_token_id=2)
    assert from_pretrained(f"hf:{folder}").config.model.text.pooling == "argmax"
    assert_matches_transformers(folder, transformers.CLIPModel, siglip=False)


def test_the_clip_tokenizer_gives_transformers_and_open_clip_ids(hf_clip: Path) -> None:
    loaded = from_pretrained(f"hf:{hf_clip}")
    captions = ["A photo of a CAT.", "two dogs, playing in the snow!", "x" * 40, "don't stop"]
    ids, mask = loaded.tokenizer(captions, CONTEXT_LENGTH)
    expected = transformers.CLIPTokenizer.from_pretrained(hf_clip)(
        captions, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt"
    )
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.tokenize(captions, context_length=CONTEXT_LENGTH)  # OpenAI's SimpleTokenizer, 0-padded
    assert torch.equal(torch.where(mask.bool(), ids, 0), reference[:, : ids.shape[1]])


def test_the_preprocessing_comes_from_the_folder(hf_clip: Path) -> None:
    image = from_pretrained(f"hf:{hf_clip}").config.model.image
    assert image.image_size == 32 and image.interpolation == "bilinear"
    assert image.mean == pytest.approx([0.5, 0.4, 0.3]) and image.std == pytest.approx([0.2, 0.25, 0.3])


def test_import_writes_an_ordinary_checkpoint_and_never_overwrites(hf_clip: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "clip.pt"
    assert main(["import", f"hf:{hf_clip}", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded, imported = load_checkpoint(out), from_pretrained(f"hf:{hf_clip}")
    assert loaded.step == 0 and loaded.config == imported.config
    pixels = image_batch()
    ids, mask = loaded.tokenizer(CAPTIONS, CONTEXT_LENGTH)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(pixels), imported.model.encode_image(pixels))
        assert torch.equal(loaded.model.encode_text(ids, mask), imported.model.encode_text(ids, mask))
    assert torch.load(out, weights_only=True)["imported_from"] == f"hf:{hf_clip}"

    before = out.read_bytes()
    assert main(["import", f"hf:{hf_clip}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_bytes() == before


def run_import_error(spec: str, out: Path, capsys) -> str:
    """The one-line error of ``clipforge import SPEC`` (exit 2, nothing written)."""
    capsys.readouterr()  # what the test itself wrote (transformers' progress bars)
    assert main(["import", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge import: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    return err


def test_a_folder_without_config_json_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    err = run_import_error(f"hf:{tmp_path / 'empty'}", tmp_path / "out.pt", capsys)
    assert "has no config.json" in err and "CLIPModel or SiglipModel" in err


def test_another_model_type_is_refused_naming_what_was_found(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bert"
    transformers.BertModel(
        transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(folder)
    err = run_import_error(f"hf:{folder}", tmp_path / "out.pt", capsys)
    assert "model_type 'bert'" in err and "BertModel" in err
    assert "CLIPModel (model_type 'clip')" in err and "SiglipModel (model_type 'siglip')" in err


def test_a_config_that_does_not_fit_the_weights_names_the_first_keys(hf_clip: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "deeper"
    folder.mkdir()
    for item in hf_clip.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3  # the weights hold 2
    (folder / "config.json").write_text(json.dumps(config))
    err = run_import_error(f"hf:{folder}", tmp_path / "out.pt", capsys)
    assert "do not match" in err and "vision_model.encoder.layers.2.layer_norm1.weight" in err

    config["vision_config"]["num_hidden_layers"] = 2
    config["text_config"]["hidden_size"] = 32  # the weights are 64 wide
    (folder / "config.json").write_text(json.dumps(config))
    err = run_import_error(f"hf:{folder}", tmp_path / "out.pt", capsys)
    assert "shapes differ" in err and "text_tower.token_embedding.weight" in err


def test_a_path_that_is_no_spec_says_what_a_spec_is(tmp_path: Path, hf_clip: Path, capsys) -> None:
    err = run_import_error(str(tmp_path / "nothing.pt"), tmp_path / "out.pt", capsys)
    assert "hf:<folder or hub id>" in err and "open_clip:CONFIG.json:WEIGHTS" in err
    err = run_import_error(str(hf_clip), tmp_path / "out.pt", capsys)
    assert f"write hf:{hf_clip}" in err
