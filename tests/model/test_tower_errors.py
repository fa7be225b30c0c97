"""Towers without silent surprises: a named Hugging Face model loads its weights unless told not to, a
pretrained tower cannot meet a BPE trained here, wrong names fail with errors that teach (exit 2 through the
CLI, nothing written), and transformers stays quiet while clipforge loads. Nothing touches the network."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModel
from transformers.utils import logging as hf_logging

from clipforge.cli import main
from clipforge.config import (
    ConfigError,
    ImageTowerConfig,
    TextTowerConfig,
    TokenizerConfig,
    config_from_dict,
    save_config,
)
from clipforge.data.hf_loading import hf_from_pretrained, quiet_transformers
from clipforge.data.tokenize import build_tokenizer, load_hf_tokenizer
from clipforge.model.text import build_hf_tower, build_transformer_tower
from clipforge.model.vision import build_timm_tower, build_torchvision_tower
from tests.conftest import tiny_config, write_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tower-errors") / "bert")


def saved_embeddings(folder: Path) -> torch.Tensor:
    return AutoModel.from_pretrained(folder, local_files_only=True).embeddings.word_embeddings.weight


def hf_text(folder: Path | str, **overrides) -> TextTowerConfig:
    return TextTowerConfig(kind="hf", name=str(folder), context_length=16, **overrides)


def run_cli(tmp_path: Path, manifest: Path, capsys, *overrides: str) -> tuple[int, str, Path]:
    """``clipforge train`` on the shapes with ``overrides``: (exit code, stderr, the run's output folder)."""
    output = tmp_path / "run"
    save_config(tiny_config(manifest, output, train={"steps": 2}), tmp_path / "tiny.yaml")
    code = main(["train", str(tmp_path / "tiny.yaml"), *overrides])
    return code, capsys.readouterr().err, output


def written(output: Path) -> list[Path]:
    return sorted(output.rglob("*")) if output.exists() else []


# ---------------------------------------------------------------- a. named weights are the default
def test_a_named_hf_tower_loads_its_weights_unless_told_not_to(bert: Path, caplog) -> None:
    assert TextTowerConfig().pretrained is True
    reference = saved_embeddings(bert)
    with caplog.at_level(logging.INFO, logger="clipforge"):
        default = build_hf_tower(hf_text(bert))
    assert f"text tower: weights of {bert}" in caplog.text
    torch.testing.assert_close(default.encoder.embeddings.word_embeddings.weight, reference)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipforge"):
        random = build_hf_tower(hf_text(bert, pretrained=False))
    assert f"text tower: random init from {bert}'s config" in caplog.text
    assert not torch.equal(random.encoder.embeddings.word_embeddings.weight, reference)
    # the older spellings keep their meaning: "default" = the weights of name, null = random
    torch.testing.assert_close(
        build_hf_tower(hf_text(bert, pretrained="default")).encoder.embeddings.word_embeddings.weight, reference
    )
    assert not torch.equal(
        build_hf_tower(hf_text(bert, pretrained=None)).encoder.embeddings.word_embeddings.weight, reference
    )


def test_pretrained_reads_true_false_or_a_location_from_yaml_values(bert: Path) -> None:
    def text_section(**text) -> TextTowerConfig:
        values = {"kind": "hf", "name": str(bert), "tokenizer": {"kind": "hf"}, **text}
        return config_from_dict({"model": {"text": values}}).model.text

    assert text_section().pretrained is True and text_section().weights_location() == str(bert)
    assert text_section(pretrained=False).weights_location() is None
    assert text_section(pretrained="other/folder").weights_location() == "other/folder"
    with pytest.raises(ConfigError, match="the built-in text transformer has no pretrained weights"):
        config_from_dict({"model": {"text": {"kind": "transformer", "pretrained": "default"}}})
    with pytest.raises(ConfigError, match="the built-in text transformer has no pretrained weights"):
        build_transformer_tower(TextTowerConfig(pretrained="some/weights"), vocab_size=10)
    assert build_transformer_tower(TextTowerConfig(width=32, depth=1, heads=2), vocab_size=10).output_dim == 32


# ---------------------------------------------------------------- b. a pretrained tower needs its own tokenizer
def test_a_pretrained_hf_tower_with_the_default_bpe_is_refused_up_front(
    bert: Path, shapes_manifest: Path, tmp_path: Path, capsys
) -> None:
    with pytest.raises(ConfigError, match="set model.text.tokenizer.kind=hf"):
        config_from_dict({"model": {"text": {"kind": "hf", "name": str(bert)}}})
    # random weights learn whatever ids they are given: a BPE is fine there
    config_from_dict({"model": {"text": {"kind": "hf", "name": str(bert), "pretrained": False}}})
    code, err, output = run_cli(tmp_path, shapes_manifest, capsys, "model.text.kind=hf", f"model.text.name={bert}")
    assert code == 2
    assert err.startswith("clipforge train: error: model.text.kind='hf' loads the pretrained weights of")
    assert "model.text.tokenizer.kind='bpe' (the default)" in err and "Traceback" not in err
    assert written(output) == []  # refused before the run folder was made


# ---------------------------------------------------------------- c. wrong Hugging Face names
def test_a_mistyped_hf_folder_or_id_is_a_config_error(bert: Path, tmp_path: Path) -> None:
    typo = str(bert) + "-tny"
    with pytest.raises(ConfigError, match=rf"model.text.name='{typo}': no such folder"):
        build_hf_tower(hf_text(typo))
    with pytest.raises(ConfigError, match=rf"model.text.pretrained='{typo}': no such folder"):
        build_hf_tower(hf_text(bert, pretrained=typo))
    with pytest.raises(ConfigError, match=rf"model.text.name='{typo}': no such folder"):
        build_hf_tower(hf_text(typo, pretrained=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder without config.json"):
        build_hf_tower(hf_text(tmp_path / "empty"))
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text((bert / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"model.text.name='.*config-only': .*model.safetensors"):
        build_hf_tower(hf_text(tmp_path / "config-only"))

    def not_on_the_hub(location: str, **kwargs):  # what transformers raises for an id it cannot find
        raise OSError(f"{location} is not a local folder and is not a valid model identifier")

    with pytest.raises(ConfigError) as error:
        hf_from_pretrained(not_on_the_hub, "bert-base-uncasd", "model.text.name")
    assert str(error.value) == (
        "model.text.name='bert-base-uncasd' is neither a local folder with config.json nor a Hugging Face hub id "
        "that is cached here or can be downloaded (offline, with HF_HUB_OFFLINE=1, only cached ids load)"
    )


def test_a_mistyped_tokenizer_folder_names_its_field(bert: Path, tmp_path: Path) -> None:
    typo = str(bert) + "-tny"
    with pytest.raises(ConfigError, match=rf"model.text.tokenizer.name='{typo}': no such folder"):
        build_tokenizer(TokenizerConfig(kind="hf", name=typo), str(bert), None)
    with pytest.raises(ConfigError, match=rf"model.text.name='{typo}': no such folder"):
        build_tokenizer(TokenizerConfig(kind="hf"), typo, None)
    (tmp_path / "weights-only").mkdir()
    (tmp_path / "weights-only" / "config.json").write_text((bert / "config.json").read_text())
    with pytest.raises(ConfigError, match="is a folder without tokenizer.json or tokenizer_config.json"):
        load_hf_tokenizer(str(tmp_path / "weights-only"))  # transformers would build an empty vocabulary
    assert load_hf_tokenizer(str(bert)).vocab_size == 16


def test_a_mistyped_hf_folder_exits_2_through_the_cli(
    bert: Path, shapes_manifest: Path, tmp_path: Path, capsys
) -> None:
    typo = str(bert) + "-tny"
    overrides = ("model.text.kind=hf", f"model.text.name={typo}", "model.text.tokenizer.kind=hf")
    code, err, output = run_cli(tmp_path, shapes_manifest, capsys, *overrides)
    assert code == 2
    assert err.strip() == (
        f"clipforge train: error: model.text.name='{typo}': no such folder (a path to a folder written by "
        "save_pretrained)"
    )
    assert not any(path.is_file() for path in written(output))  # no config, checkpoint or log


# ---------------------------------------------------------------- d. unknown library backbones
def test_unknown_torchvision_and_timm_names_suggest_close_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"model.image.name='resnet999' is not a torchvision model; did you mean.*'resnet\d+'"
    ):
        build_torchvision_tower(ImageTowerConfig(kind="torchvision", name="resnet999"))
    with pytest.raises(
        ConfigError, match=r"model.image.name='resnet999' is not a timm model; did you mean.*'resnet\d+'"
    ):
        build_timm_tower(ImageTowerConfig(kind="timm", name="resnet999"))
    with pytest.raises(ConfigError, match=r"model.image.name: timm has no pretrained tag 'bogus' for 'test_vit'"):
        build_timm_tower(ImageTowerConfig(kind="timm", name="test_vit.bogus"))
    with pytest.raises(ConfigError, match=r"model.image.pretrained: timm has no pretrained tag 'bogus'.*'r160_in1k'"):
        build_timm_tower(ImageTowerConfig(kind="timm", name="test_vit", pretrained="bogus"))


def test_an_unknown_torchvision_name_exits_2_through_the_cli(shapes_manifest: Path, tmp_path: Path, capsys) -> None:
    overrides = ("model.image.kind=torchvision", "model.image.name=resnet999")
    code, err, output = run_cli(tmp_path, shapes_manifest, capsys, *overrides)
    assert code == 2
    assert err.startswith("clipforge train: error: model.image.name='resnet999' is not a torchvision model")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not any(path.is_file() for path in written(output))


# ---------------------------------------------------------------- e. transformers stays quiet
def test_loading_shows_no_progress_bars_and_keeps_warnings(bert: Path, capfd, caplog) -> None:
    capfd.readouterr()
    build_hf_tower(hf_text(bert))
    load_hf_tokenizer(str(bert))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back afterwards
    logger = hf_logging.get_logger("transformers.clipforge_test")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.DEBUG), quiet_transformers():
            logger.info("chatter")
            logger.warning("a real warning")
        assert hf_logging.get_verbosity() == hf_logging.INFO
    finally:
        hf_logging.set_verbosity(verbosity)
    assert [record.getMessage() for record in caplog.records] == ["a real warning"]


def test_an_identity_start_on_a_head_that_has_none_names_the_fix() -> None:
    from clipforge.model.heads import build_head

    with pytest.raises(ValueError, match="head='identity' has no such start: set model.text.head_init=normal"):
        build_head("identity", 16, 16, where="model.text", init="identity")
    with pytest.raises(ValueError, match="needs model.embed_dim equal to the tower's 16-d features \\(it is 8\\)"):
        build_head("linear", 16, 8, where="model.text", init="identity")
    assert torch.equal(build_head("linear", 4, 4, init="identity")(torch.eye(4)), torch.eye(4))


def test_a_head_setting_that_cannot_be_built_exits_2_through_the_cli(
    shapes_manifest: Path, tmp_path: Path, capsys
) -> None:
    overrides = ("model.text.head=identity", "model.text.head_init=identity", "model.embed_dim=48")
    code, err, output = run_cli(tmp_path, shapes_manifest, capsys, *overrides)
    assert code == 2
    assert err.strip() == (
        "clipforge train: error: model.text.head_init='identity' starts a 'linear' head at the identity; "
        "model.text.head='identity' has no such start: set model.text.head_init=normal, or model.text.head=linear"
    )
    assert not any(path.is_file() for path in written(output))
