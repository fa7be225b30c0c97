from pathlib import Path

import pytest

from clipforge.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    recipe_names,
    save_config,
)


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "train.batch_size=64",
            "loss.kind=siglip",
            "model.image.mean=[0.5, 0.5, 0.5]",
            "model.image.std=[0.5,0.5,0.5]",
            "loss.chunk_size=null",
            "optim.lr=1e-3",
        ],
    )
    assert config.train.batch_size == 64 and config.loss.kind == "siglip" and config.optim.lr == 1e-3
    assert config.model.image.mean == [0.5, 0.5, 0.5] and config.loss.chunk_size is None
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert config_to_dict(config_from_dict(config_to_dict(config))) == config_to_dict(config)


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 8\nmodel:\n  text:\n    depth: 2\n")
    config = load_config(path, ["train.steps=9"])
    assert (config.train.steps, config.train.batch_size, config.model.text.depth) == (9, 8, 2)


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.batch_szie=4"])
    message = str(info.value)
    assert "train.batch_szie" in message and "train.batch_size" in message and "allows" in message


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {"steps": 3}})


def test_wrong_type_and_wrong_choice() -> None:
    with pytest.raises(ConfigError, match=r"train.batch_size='big'.*integer"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match=r"loss.kind='softmax'.*\['clip', 'siglip'\]"):
        load_config(None, ["loss.kind=softmax"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(None, ["data.augment.hflip=3"])


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.kind=manifest"])
    with pytest.raises(ConfigError, match="accumulation_steps"):
        load_config(None, ["train.batch_size=10", "train.accumulation_steps=4"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["model.image.image_size=50"])


def test_override_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe"):
        load_config(tmp_path / "nope.yaml")


def test_every_shipped_recipe_loads() -> None:
    names = recipe_names()
    assert "demo" in names
    for name in names:
        assert isinstance(load_config(name), Config)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: 10\n  batch_size: [8\nloss:\n  kind: clip\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: .* at line \d+, column \d+"):
        load_config(broken)


def test_a_yaml_syntax_error_in_an_override_names_the_override() -> None:
    with pytest.raises(ConfigError, match=r"override 'model.image.mean=\[0.5,': the value is not valid YAML"):
        load_config("demo", ["model.image.mean=[0.5,"])


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml is not UTF-8 text"):
        load_config(latin)


def test_an_empty_config_file_is_refused_not_trained_with_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty: a config needs its sections"):
        load_config(empty)


def test_caption_templates_are_checked_before_anything_runs() -> None:
    assert load_config(None, ['data.caption_templates=["a drawing of {}."]']).data.caption_templates == [
        "a drawing of {}."
    ]
    with pytest.raises(ConfigError, match=r"data.caption_templates: template 0 'a drawing' has no '\{\}'"):
        load_config(None, ['data.caption_templates=["a drawing"]'])
    with pytest.raises(ConfigError, match=r"data.mix\[0\].caption_templates.*one class name"):
        config_from_dict({"data": {"kind": "mix", "mix": [{"kind": "emoji", "caption_templates": ["{} and {}"]}]}})
    with pytest.raises(ConfigError, match="shards stream their captions"):
        load_config(None, ["data.kind=webdataset", "data.path=x.tar", 'data.caption_templates=["a {}"]'])
