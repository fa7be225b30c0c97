"""The data section: one dataclass per data kind, chosen by ``kind``, each checking itself; the upgrade of the
sections older versions wrote (every field of every kind)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.commands.data_spec import parse_data_spec
from clipforge.config import (
    DATA_KINDS,
    Config,
    ConfigError,
    DataConfig,
    EmojiData,
    ManifestData,
    MixData,
    config_from_dict,
    config_to_dict,
    data_config_from_dict,
    load_config,
    register_data_kind,
    save_config,
    upgrade_data_section,
)
from clipforge.config.data_upgrade import FORMAT1_DATA_FIELDS

FIXTURES = Path(__file__).parent / "fixtures"
# a value each required field may take in a config (validation reads no file)
REQUIRED_VALUES = {"path": "data/x.csv", "name": "flags", "mix": [{"kind": "emoji"}]}
ALL_FIELDS = sorted({name for cls in DATA_KINDS.values() for name in cls.own_fields()})


def minimal(kind: str) -> dict:
    """The smallest valid data section of ``kind``: its required fields set."""
    cls = DATA_KINDS[kind]
    needed = [*cls.required, *(["mix"] if kind == "mix" else [])]
    return {"kind": kind, **{name: REQUIRED_VALUES[name] for name in needed}}


def a_valid_value(name: str):
    """A value of the field ``name`` that passes validation wherever the field exists."""
    if name in REQUIRED_VALUES:
        return REQUIRED_VALUES[name]
    owner = next(cls for cls in DATA_KINDS.values() if name in cls.__dataclass_fields__)
    default = owner.__dataclass_fields__[name]
    return default.default_factory() if default.default_factory is not dataclasses.MISSING else default.default


def test_every_kind_has_its_class_and_only_its_own_fields() -> None:
    shared = set(DataConfig.shared_fields())
    assert list(DATA_KINDS) == [
        *("emoji", "corpus", "manifest", "coco", "flickr", "imagefolder", "idx", "cifar", "hf", "torchvision"),
        *("webdataset", "mix"),
    ]
    for kind, cls in DATA_KINDS.items():
        data = config_from_dict({"data": minimal(kind)}).data
        assert type(data) is cls and data.kind == kind
        assert {f.name for f in dataclasses.fields(data)} == {"kind", *shared, *cls.own_fields()}
        assert not shared & set(cls.own_fields())
    assert set(ManifestData.own_fields()) == {"path", "image_column", "caption_column", "label_column"}
    assert "split" not in ManifestData.own_fields() and "split" in EmojiData.own_fields()


@settings(max_examples=150, deadline=None)
@given(kind=st.sampled_from(list(DATA_KINDS)), name=st.sampled_from(ALL_FIELDS), where=st.sampled_from(["top", "eval"]))
def test_a_field_is_accepted_exactly_when_the_kind_has_it(kind: str, name: str, where: str) -> None:
    section = {**minimal(kind), name: a_valid_value(name)}
    prefix = "data" if where == "top" else "eval.tasks[0].data"
    task = {"name": "t", "task": "retrieval", "data": section}
    values = {"data": section} if where == "top" else {"eval": {"tasks": [task]}}
    if where == "eval" and kind == "mix":
        return  # a mix is for training, refused as an eval task whatever its fields
    has_it = name in DATA_KINDS[kind].own_fields()
    if where == "eval" and not DATA_KINDS[kind].capabilities.evaluable:
        with pytest.raises(ConfigError, match="cannot be evaluated" if has_it else f"has no {name}"):
            config_from_dict(values)
        return
    if has_it:
        config = config_from_dict(values)
        data = config.data if where == "top" else config.eval.tasks[0].data
        assert name == "mix" or getattr(data, name) == a_valid_value(name)
    else:
        with pytest.raises(ConfigError) as refused:
            config_from_dict(values)
        message = str(refused.value)
        assert message.startswith(f"{prefix}.{name}=")
        assert (
            f"{prefix}.kind={kind!r} has no {name}" in message
            and "so the setting would do nothing; remove it" in message
        )
        for own in DATA_KINDS[kind].own_fields():  # the fields the kind does have are listed
            assert own in message


def test_split_on_a_kind_without_splits_says_what_to_do_instead() -> None:
    with pytest.raises(ConfigError) as refused:
        config_from_dict({"data": {"kind": "manifest", "path": "pairs.csv", "split": "test"}})
    message = str(refused.value)
    assert message.startswith("data.split='test': data.kind='manifest' has no split")
    assert "it reads all of what data.path names" in message and "would do nothing" in message
    assert "point data.path at the split's own file" in message
    assert "manifest takes path, image_column, caption_column, label_column" in message
    with pytest.raises(ConfigError, match=r"^--data: data.split='test': data.kind='coco' has no split"):
        parse_data_spec(["kind=coco", "path=c.json", "split=test"])


def test_an_unknown_kind_lists_the_kinds_and_a_typo_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"data.kind='manifesto' is not allowed; choose one of \['emoji', 'corpus'"):
        load_config(None, ["data.kind=manifesto"])
    with pytest.raises(ConfigError, match=r"data.mix\[0\].kind=3 is not allowed; choose one of"):
        config_from_dict({"data": {"kind": "mix", "mix": [{"kind": 3}]}})
    with pytest.raises(ConfigError, match=r"unknown config key 'data.pth' \(did you mean 'data.path'\?\)"):
        load_config(None, ["data.kind=manifest", "data.pth=x.csv"])
    with pytest.raises(ConfigError, match="is not allowed; choose one of"):
        DataConfig(kind="nope")


def test_python_construction_picks_the_kind_and_behaves_like_a_dataclass() -> None:
    data = DataConfig(kind="manifest", path="pairs.csv", num_workers=2)
    assert type(data) is ManifestData and data.path == "pairs.csv" and data.num_workers == 2
    assert type(DataConfig()) is EmojiData and type(Config().data) is EmojiData
    assert dataclasses.replace(data, path="other.csv") == ManifestData(path="other.csv", num_workers=2)
    assert pickle.loads(pickle.dumps(data)) == data and copy.deepcopy(data) == data
    mix = DataConfig(kind="mix", mix=[DataConfig(kind="emoji"), DataConfig(kind="manifest", path="m.csv")])
    assert type(mix) is MixData and mix.input_paths() == ["m.csv"] and data.get("split", "-") == "-"


def test_overrides_and_data_specs_reach_kind_fields_and_nested_shared_fields() -> None:
    config = load_config(None, ["data.kind=flickr", "data.path=f.json", "data.split=test", "data.augment.hflip=true"])
    assert (config.data.kind, config.data.split, config.data.augment.hflip) == ("flickr", "test", True)
    data = data_config_from_dict({"kind": "webdataset"}, ["path=s/{0..3}.tar", "shuffle_buffer=5", "num_workers=2"])
    assert (data.path, data.shuffle_buffer, data.num_workers) == ("s/{0..3}.tar", 5, 2)


@pytest.mark.parametrize("order", ["kind first", "kind last"])
def test_an_override_of_the_kind_starts_a_new_source_keeping_the_shared_settings(order: str) -> None:
    overrides = ["data.kind=manifest", "data.path=pairs.csv"]
    config = load_config("demo-lit", overrides if order == "kind first" else overrides[::-1])
    shipped = load_config("demo-lit").data  # a mix, with one cached view and inverted pictures
    assert type(config.data) is ManifestData and config.data.path == "pairs.csv"
    assert config.data.cached_views == shipped.cached_views == 1 and config.data.augment == shipped.augment
    with pytest.raises(ConfigError, match="data.kind='manifest' has no split"):
        load_config("demo", ["data.kind=manifest", "data.path=pairs.csv", "data.split=train"])
    assert load_config("demo", ["data.kind=emoji", "data.split=val"]).data.split == "val"  # same kind: kept


def test_every_kind_round_trips_and_saves_kind_then_its_fields_then_the_shared_ones(tmp_path: Path) -> None:
    for kind in DATA_KINDS:
        section = {**minimal(kind), "num_workers": 1, "caption_templates": ["a {}"] if kind != "webdataset" else []}
        tasks = [] if kind == "mix" else [{"name": "t", "task": "retrieval", "data": minimal(kind)}]
        if not DATA_KINDS[kind].capabilities.evaluable:
            tasks = []
        config = config_from_dict({"data": section, "eval": {"tasks": tasks}})
        values = config_to_dict(config)
        assert config_from_dict(values) == config and config_to_dict(config_from_dict(values)) == values
        assert list(values["data"]) == ["kind", *DATA_KINDS[kind].own_fields(), *DataConfig.shared_fields()]
        save_config(config, tmp_path / f"{kind}.yaml")
        assert load_config(tmp_path / f"{kind}.yaml") == config


def test_eval_tasks_ask_the_kind_whether_it_can_be_evaluated_and_has_labels() -> None:
    shards = {"name": "val", "task": "retrieval", "data": {"kind": "webdataset", "path": "s/{0..1}.tar"}}
    # shards stream, and evaluation indexes them with a scan of their headers
    assert config_from_dict({"eval": {"tasks": [shards]}}).eval.tasks[0].data.path == "s/{0..1}.tar"
    coco = {"name": "val", "task": "zeroshot", "data": {"kind": "coco", "path": "c.json"}}
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\].task='zeroshot' needs class labels, and .*'coco' has none"):
        config_from_dict({"eval": {"tasks": [coco]}})
    assert config_from_dict({"eval": {"tasks": [{**coco, "task": "retrieval"}]}}).eval.tasks[0].data.path == "c.json"


def test_a_kind_is_registered_once() -> None:
    with pytest.raises(TypeError, match="taken"):
        register_data_kind(ManifestData)
    with pytest.raises(TypeError, match="not a DataConfig dataclass"):
        register_data_kind(Config)


def test_the_config_package_imports_without_torch() -> None:
    """The config layer (and so the data kinds) must load where torch does not: the CLI parses before it builds."""
    source = Path(__file__).parent.parent / "src" / "clipforge"
    script = (
        "import sys, types\n"
        "sys.modules['torch'] = None\n"  # any import of torch now raises ImportError
        "package = types.ModuleType('clipforge')\n"
        f"package.__path__ = [{str(source)!r}]\n"  # the package without its __init__ (the public API needs torch)
        "sys.modules['clipforge'] = package\n"
        "import clipforge.config as config\n"
        "assert 'torch' not in [name for name, module in sys.modules.items() if module is not None]\n"
        "print(len(config.DATA_KINDS), type(config.load_config('demo').data).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12", "EmojiData"]


# ----------------------------------------------------------------------------------------------
# Sections as format 1 wrote them: every field of the old union, for every kind
# ----------------------------------------------------------------------------------------------
FORMAT1_DEFAULTS = {  # the old union's defaults (DataConfig before the data kinds had a class each)
    "kind": "emoji",
    "name": "",
    "captions": "name",
    "path": "",
    "image_root": "",
    "split": "train",
    "classnames": "",
    "image_column": "image",
    "caption_column": "caption",
    "label_column": "label",
    "caption_sampling": "random",
    "caption_templates": [],
    "epoch_size": None,
    "shuffle_buffer": 1000,
    "resample": False,
    "mix": [],
    "weight": 1.0,
    "num_workers": 0,
    "augment": {"scale_min": 0.8, "hflip": False, "color_jitter": 0.0, "grayscale": 0.0, "invert": 0.0, "low_res": 0.0},
    "cache_features": True,
    "cached_views": 0,
    "feature_cache": "",
}


def as_format1(section: dict) -> dict:
    """A section of today's layout as format 1 stored it: the old union's defaults under its own values."""
    old = {**copy.deepcopy(FORMAT1_DEFAULTS), **copy.deepcopy(section)}
    old["mix"] = [as_format1(entry) for entry in old["mix"]]
    return old


@pytest.mark.parametrize("name", ["train", "imported-siglip", "hf-text"])
def test_format1_checkpoints_configs_upgrade_to_the_same_values(name: str) -> None:
    import torch

    stored = torch.load(FIXTURES / f"format1-{name}.pt", weights_only=True)["config"]
    before = copy.deepcopy(stored)
    assert tuple(stored["data"]) == FORMAT1_DATA_FIELDS
    with pytest.raises(ConfigError, match="has no"):
        config_from_dict(stored)  # as stored: fields its kind does not have
    upgraded = upgrade_data_section(stored)
    assert stored == before, "the upgrade changes its argument"
    config = config_from_dict(upgraded)
    data = config_to_dict(config)["data"]
    assert set(data) <= set(FORMAT1_DATA_FIELDS)
    assert {key: stored["data"][key] for key in data} == data  # every value the kind has is kept
    dropped = set(FORMAT1_DATA_FIELDS) - set(data)
    assert all(stored["data"][key] == FORMAT1_DEFAULTS[key] for key in dropped)  # what was dropped did nothing
    assert {key: value for key, value in upgraded.items() if key != "data"} == {
        key: value for key, value in stored.items() if key != "data"
    }
    assert upgrade_data_section(upgraded) == upgraded


@pytest.mark.parametrize("name", ["train", "imported-siglip", "hf-text"])
def test_format1_checkpoints_still_load(name: str) -> None:
    from clipforge.interop.load import load_checkpoint

    loaded = load_checkpoint(FIXTURES / f"format1-{name}.pt")
    assert loaded.config.data.kind in ("manifest", "emoji")


SECTIONS = st.sampled_from(list(DATA_KINDS)).flatmap(
    lambda kind: st.fixed_dictionaries(
        {key: st.just(value) for key, value in minimal(kind).items()},
        optional={
            name: st.just(a_valid_value(name))
            for name in (*DATA_KINDS[kind].own_fields(), "num_workers", "weight")
            if name not in minimal(kind)
        },
    )
)


@settings(max_examples=60, deadline=None)
@given(data=SECTIONS, task_data=SECTIONS)
def test_any_config_written_as_format1_upgrades_back_to_itself(data: dict, task_data: dict) -> None:
    """Every kind, in data, in mix entries and in eval tasks: dumped as the old union, upgraded, read again."""
    evaluable = DATA_KINDS[task_data["kind"]].capabilities.evaluable and task_data["kind"] != "mix"
    task = {"name": "t", "task": "retrieval", "data": task_data}
    config = config_from_dict({"data": data, "eval": {"tasks": [task] if evaluable else []}})
    values = config_to_dict(config)
    old = copy.deepcopy(values)
    old["data"] = as_format1(old["data"])
    for stored in old["eval"]["tasks"]:
        stored["data"] = as_format1(stored["data"])
    assert config_from_dict(upgrade_data_section(old)) == config


def test_upgrade_reaches_every_mix_entry_and_every_eval_task() -> None:
    entries = [
        {"kind": "manifest", "path": "m.csv", "weight": 2.0},
        {"kind": "corpus", "name": "flags", "split": "val"},
    ]
    tasks = [
        {"name": "a", "task": "retrieval", "data": {"kind": "coco", "path": "c.json", "image_root": "images"}},
        {"name": "b", "task": "zeroshot", "data": {"kind": "cifar", "path": "cifar", "split": "test"}},
    ]
    config = config_from_dict({"data": {"kind": "mix", "mix": entries}, "eval": {"tasks": tasks}})
    old = config_to_dict(config)
    old["data"] = as_format1(old["data"])
    for task in old["eval"]["tasks"]:
        task["data"] = as_format1(task["data"])
    assert all(tuple(entry) == FORMAT1_DATA_FIELDS for entry in old["data"]["mix"])
    upgraded = upgrade_data_section(old)
    assert [set(entry) - set(DataConfig.shared_fields()) for entry in upgraded["data"]["mix"]] == [
        {"kind", "path", "image_column", "caption_column", "label_column"},
        {"kind", "name", "split"},
    ]
    assert config_from_dict(upgraded) == config


def test_upgrade_leaves_what_it_cannot_read_for_the_parser_to_refuse() -> None:
    values = {"data": {"kind": "nope", "split": "x"}, "eval": {"tasks": [{"data": 3}, "x"]}, "train": {}}
    assert upgrade_data_section(values) == values
    assert upgrade_data_section({"data": {"split": "val", "path": "x"}}) == {"data": {"split": "val"}}  # emoji
    assert upgrade_data_section({"data": {"kind": "manifest", "path": "m.csv", "colour": 1}})["data"]["colour"] == 1


def test_a_config_yaml_an_older_clipforge_wrote_loads_and_a_new_one_is_strict(tmp_path: Path) -> None:
    old = config_to_dict(config_from_dict({"data": {"kind": "manifest", "path": "pairs.csv", "num_workers": 3}}))
    old["data"] = as_format1(old["data"])
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    data = load_config(tmp_path / "old.yaml").data
    assert type(data) is ManifestData and (data.path, data.num_workers) == ("pairs.csv", 3)
    assert data_config_from_dict(old["data"], ["path=other.csv"]).path == "other.csv"
    edited = config_to_dict(load_config(tmp_path / "old.yaml"))
    edited["data"]["split"] = "test"  # today's layout is checked as it stands
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(edited))
    with pytest.raises(ConfigError, match="data.kind='manifest' has no split"):
        load_config(tmp_path / "new.yaml")
