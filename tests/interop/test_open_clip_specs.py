"""open_clip specs and the command line: each spec form's mistakes in one line, ``clipforge export open_clip``, and
open_clip's caption clean-up rules reproduced exactly (generated captions)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.cli import main
from clipforge.data.text_clean import CLEAN_RULES, text_cleaner
from clipforge.data.tokenize import Tokenizer
from tests.interop.tiny_models import write_open_clip, write_trained_style_checkpoint

open_clip = pytest.importorskip("open_clip")


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("open_clip:ViT-B-32-quickgelo", "is not a model of open_clip's registry (did you mean ViT-B-32-quickgelu"),
        ("open_clip:RN50:openai-v2", "'openai-v2' is neither a weights file nor one of open_clip's pretrained tags"),
        ("open_clip:model.json", "names a config without weights: open_clip:CONFIG.json:WEIGHTS"),
        ("open_clip:local-dir:/no/such/folder", "no folder '/no/such/folder'"),
    ],
)
def test_a_spec_that_names_nothing_says_so_in_one_line(spec: str, expected: str, tmp_path: Path, capsys) -> None:
    err = one_line_error(["import", spec, "--out", str(tmp_path / "out.pt")], capsys)
    assert expected in err and not (tmp_path / "out.pt").exists()


def test_an_unreachable_hub_says_how_to_import_offline(tmp_path: Path, capsys, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    err = one_line_error(["import", "open_clip:hf-hub:timm/ViT-B-16-SigLIP2", "--out", str(tmp_path / "o.pt")], capsys)
    assert "could not be downloaded from the Hugging Face hub" in err and "open_clip:local-dir:FOLDER" in err


def test_export_open_clip_from_the_command_line_writes_a_folder_open_clip_loads(tmp_path: Path, capsys) -> None:
    config_path, weights, reference = write_open_clip(tmp_path / "released", name="tiny-cli-export")
    checkpoint = tmp_path / "model.pt"
    assert main(["import", f"open_clip:{config_path}:{weights}", "--out", str(checkpoint)]) == 0
    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", "open_clip", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"open_clip.create_model_and_transforms('local-dir:{out}') matches clipforge within" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]  # fmt: skip  (CLIP's BPE: open_clip's own tokenizer)
    model = open_clip.create_model(f"local-dir:{out}")
    assert model.state_dict().keys() == reference.state_dict().keys()

    err = one_line_error(["export", "open_clip", "--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert "is not an empty folder" in err


def test_a_model_open_clip_cannot_express_is_refused_naming_the_part(tmp_path: Path, capsys) -> None:
    checkpoint, _ = write_trained_style_checkpoint(tmp_path, image={"pool": "map", "pre_norm": False})
    out = tmp_path / "exported"
    err = one_line_error(["export", "open_clip", "--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert "a built-in ViT with attention pooling has no open_clip counterpart" in err and "export onnx" in err
    assert not out.exists()


def test_a_clipforge_trained_model_exports_to_open_clip(tmp_path: Path) -> None:
    """A model trained here (built-in towers, a BPE trained on its captions, ``eot`` pooling) exports too: the text
    pools at the tokenizer's end-of-text id, and the BPE's files go beside the config."""
    from clipforge import from_pretrained
    from clipforge.interop.open_clip.export import export_open_clip

    checkpoint, _ = write_trained_style_checkpoint(tmp_path)
    result = export_open_clip(from_pretrained(checkpoint), tmp_path / "exported")
    assert result.max_difference < 1e-5
    assert (result.folder / "tokenizer.json").is_file()


# ----------------------------------------------------------------------------------------------
# open_clip's caption clean-up
# ----------------------------------------------------------------------------------------------
# pieces a caption is made of: letters, the punctuation canonicalize removes, white space of several kinds, HTML
# entities (unescaped twice), non-ASCII letters and mojibake (what ftfy repairs)
PIECES = [*"aB c_D,.!?'-&;#\t\n", "  ", "&amp;", "&amp;amp;", "&lt;", "é", "Ä", "ß", "文", "\u00a0", "Ã©", "â€™"]
CAPTION_TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=CAPTION_TEXT, rule=st.sampled_from(CLEAN_RULES))
def test_captions_are_cleaned_exactly_as_open_clip_cleans_them(text: str, rule: str) -> None:
    from open_clip.tokenizer import get_clean_fn

    assert text_cleaner(rule)(text) == get_clean_fn(rule)(text)


def test_a_tokenizer_keeps_open_clip_rules_through_its_state(tmp_path: Path) -> None:
    """clean, strip_sep_token and pad_id travel in the tokenizer's state (checkpoints), giving the same ids."""
    from clipforge.data.tokenize import load_hf_tokenizer
    from tests.interop.zoo_models import write_tokenizer

    folder = write_tokenizer(tmp_path / "bert", "bert")
    tokenizer = load_hf_tokenizer(str(folder), padding="max_length", clean="canonicalize", strip_sep_token=True)
    captions = ["A Small, RED circle!", "x"]  # canonicalized: "a small red circle"
    ids, mask = tokenizer(captions, 8)
    assert (ids != tokenizer._backend.sep_token_id).all() and ids[1, 2] == 0 and mask[1, 2] == 0  # [SEP] -> 0
    rebuilt = Tokenizer.from_state_dict(tokenizer.state_dict())
    again_ids, again_mask = rebuilt(captions, 8)
    assert (again_ids == ids).all() and (again_mask == mask).all()
    assert ids[0, 1:5].tolist() == tokenizer._backend.convert_tokens_to_ids(["a", "small", "red", "circle"])
