"""Importing open_clip ViT checkpoints (and OpenAI-style state dicts) into the built-in towers: the same outputs as
open_clip, and refusals that name what has no counterpart (every family: tests/interop/test_open_clip_zoo.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from clipforge import from_pretrained
from clipforge.cli import main
from tests.interop.tiny_models import CAPTIONS, CONTEXT_LENGTH, OPEN_CLIP_CONFIG, image_batch, write_open_clip

open_clip = pytest.importorskip("open_clip")


def variant(**changes) -> dict:
    config = copy.deepcopy(OPEN_CLIP_CONFIG)
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (config[section] if section else config)[key] = value
    return config


VARIANTS = {
    # OpenAI's layout: QuickGELU, argmax pooling, a bias-free (width, embed_dim) text projection
    "openai": OPEN_CLIP_CONFIG,
    # GELU, eos pooling, a text projection with a bias, no ln_pre, a logit bias (SigLIP loss), custom LayerNorm eps
    "variant": variant(
        quick_gelu=False,
        init_logit_bias=-10.0,
        text_cfg__pool_type="eos",
        text_cfg__eos_id=49407,
        text_cfg__proj_bias=True,
        vision_cfg__no_ln_pre=True,
        vision_cfg__norm_kwargs={"eps": 1e-6},
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_an_imported_open_clip_model_matches_open_clip(name: str, tmp_path: Path) -> None:
    config_path, weights, reference = write_open_clip(tmp_path, VARIANTS[name], name=f"tiny-{name}")
    loaded = from_pretrained(f"open_clip:{config_path}:{weights}")
    tokens = open_clip.tokenize(CAPTIONS, context_length=CONTEXT_LENGTH)
    ids, mask = loaded.tokenizer(CAPTIONS, CONTEXT_LENGTH)
    assert torch.equal(torch.where(mask.bool(), ids, 0), tokens[:, : ids.shape[1]])
    pixels = image_batch()
    with torch.no_grad():
        image_expected = reference.encode_image(pixels, normalize=True)
        text_expected = reference.encode_text(tokens, normalize=True)
        logits_expected, _ = reference.get_logits(pixels, tokens)
        output = loaded.model(pixels, ids, mask)
        logits = loaded.model.generate_similarity_matrix(pixels, ids, mask)
    assert (output.image_embeds - image_expected).abs().max() < 1e-5
    assert (output.text_embeds - text_expected).abs().max() < 1e-5
    assert (logits - logits_expected).abs().max() < 1e-5
    assert (loaded.model.logit_bias is not None) == ("init_logit_bias" in VARIANTS[name])


def test_an_openai_state_dict_with_its_size_entries_imports(tmp_path: Path) -> None:
    config_path, weights, reference = write_open_clip(tmp_path, name="tiny-openai-sizes")
    state = torch.load(weights, weights_only=True)
    # OpenAI's released state dicts also hold these sizes as tensors
    state.update(
        input_resolution=torch.tensor(32), context_length=torch.tensor(CONTEXT_LENGTH), vocab_size=torch.tensor(49408)
    )
    torch.save(state, weights)
    loaded = from_pretrained(f"open_clip:{config_path}:{weights}")
    with torch.no_grad():
        assert torch.allclose(
            loaded.model.encode_image(image_batch()), reference.encode_image(image_batch(), True), atol=1e-5
        )

    state["context_length"] = torch.tensor(77)
    torch.save(state, weights)
    with pytest.raises(ValueError, match="context_length=77, but text_cfg.context_length=16"):
        from_pretrained(f"open_clip:{config_path}:{weights}")


def import_error(spec: str, out: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["import", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge import: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    return err


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's deprecation: the test only writes one
def test_a_torchscript_archive_is_refused_without_running_it(tmp_path: Path, capsys) -> None:
    config_path, _, _ = write_open_clip(tmp_path, name="tiny-jit")
    archive = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(archive))
    err = import_error(f"open_clip:{config_path}:{archive}", tmp_path / "out.pt", capsys)
    assert "TorchScript archive" in err and "convert it with open_clip first" in err


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"vision_cfg": {**OPEN_CLIP_CONFIG["vision_cfg"], "pool": "avg"}},
            "unknown open_clip vision_cfg keys ['pool']",
        ),
        ({"text_config": {}}, "unknown open_clip config keys ['text_config']"),
        (
            {"text_cfg": {**OPEN_CLIP_CONFIG["text_cfg"], "tokenizer_mode": "clips"}},
            "text_cfg.tokenizer_mode='clips' (open_clip's experimental tokenizing) has no clipforge counterpart",
        ),
        (
            {"text_cfg": {**OPEN_CLIP_CONFIG["text_cfg"], "tokenizer_kwargs": {"reduction_mask": "random"}}},
            "text_cfg.tokenizer_kwargs ['reduction_mask'] have no clipforge counterpart",
        ),
    ],
)
def test_what_open_clip_would_not_build_either_is_refused_naming_it(
    changes: dict, expected: str, tmp_path: Path, capsys
) -> None:
    """Every architecture of open_clip's registry imports (tests/interop/test_open_clip_zoo.py); what is refused is a
    config key open_clip's own config classes do not have, and tokenizing rules clipforge does not reproduce."""
    config_path = tmp_path / "model.json"
    config_path.write_text(json.dumps({**OPEN_CLIP_CONFIG, **changes}))
    _, weights, _ = write_open_clip(tmp_path / "weights", name="tiny-refused")
    err = import_error(f"open_clip:{config_path}:{weights}", tmp_path / "out.pt", capsys)
    assert expected in err


def test_weights_of_another_config_name_the_first_keys(tmp_path: Path, capsys) -> None:
    config_path, weights, _ = write_open_clip(tmp_path, name="tiny-mismatch")
    deeper = tmp_path / "deeper.json"
    deeper.write_text(json.dumps(variant(vision_cfg__layers=3)))
    err = import_error(f"open_clip:{deeper}:{weights}", tmp_path / "out.pt", capsys)
    assert "do not match" in err and "visual.transformer.resblocks.2.ln_1.weight" in err


def test_a_spec_without_config_and_weights_is_explained(tmp_path: Path, capsys) -> None:
    err = import_error("open_clip:model.pt", tmp_path / "out.pt", capsys)
    assert "open_clip:CONFIG.json:WEIGHTS" in err
