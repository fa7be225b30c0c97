"""Classes 3 to 5 of the promises, generated: odd files for every input of every command, odd numbers for every
numeric flag, odd config values for training. The contract each time (``harness.assert_contract``): exit code 0 or
2, one line, no traceback, no hang, every input byte-identical afterwards, no temporary file left.

The inputs are read off the parsers (``add_input``), so a new command's inputs are covered without naming them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipforge.config import Config
from tests.contract.conftest import BASE_ARGV, REFUSED_BASES, World
from tests.contract.harness import assert_contract, commands, declared, make_fifo, run, snapshot, unchanged

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ODD_FILES = ["missing", "empty", "truncated", "garbage", "folder", "fifo", "symlink-loop", "wrong-type"]


def odd_file(kind: str, original: Path, world: World, folder: Path, seed: int) -> Path:
    """A path standing where ``original`` was: missing, empty, cut short, random bytes, a folder, a FIFO, a
    symlink to itself, or another kind of file (a picture for a checkpoint, a checkpoint for a picture)."""
    path = folder / f"odd-{kind}{original.suffix}"
    rng = random.Random(seed)
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        if original.is_dir():
            shutil.copytree(original, path)
            for file in sorted(p for p in path.rglob("*") if p.is_file())[::2]:
                file.write_bytes(file.read_bytes()[: rng.randint(0, max(0, file.stat().st_size - 1))])
        else:
            data = original.read_bytes()
            path.write_bytes(data[: rng.randint(0, max(0, len(data) - 1))])
    elif kind == "garbage":
        path.write_bytes(rng.randbytes(rng.choice([1, 17, 600, 5000])))
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        make_fifo(path)
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "wrong-type":
        other = world.photo if original.suffix in (".pt", ".yaml", ".csv", ".txt") else world.checkpoint
        shutil.copyfile(other, path)
    return path


def _input_cases() -> list[tuple[str, str, str]]:
    """(command, input flag, kind) for every declared input of every command that has a base command line."""
    return [
        (name, argument.flag, argument.kind)
        for name, parser in sorted(commands().items())
        for argument in declared(parser)
        if argument.role == "input"
    ]


INPUTS = _input_cases()


def _replace_input(argv: list[str], flag: str, kind: str, odd: Path) -> list[str] | None:
    """``argv`` with the value of input ``flag`` replaced by ``odd``; None when the base line does not use it."""
    argv = list(argv)
    if kind == "data":  # key=value items or a YAML file: replace the path= item, or the YAML
        for position, item in enumerate(argv):
            if item.startswith("path="):
                argv[position] = f"path={odd}"
                return argv
            if item.endswith(".yaml") and position > 0 and argv[position - 1] not in ("--out",):
                argv[position] = str(odd)
                return argv
        return None
    if not flag.startswith("--"):  # a positional: the first existing path that is not a flag's value
        for position, item in enumerate(argv[1:], start=1):
            if Path(item).exists() and not argv[position - 1].startswith("--"):
                argv[position] = str(odd)
                return argv
        return None
    if flag not in argv:
        return None
    argv[argv.index(flag) + 1] = str(odd)
    return argv


@settings(SETTINGS, max_examples=90)
@given(case=st.sampled_from(INPUTS), kind=st.sampled_from(ODD_FILES), seed=st.integers(0, 2**16))
def test_an_odd_file_for_any_input_is_one_clear_message(
    case: tuple[str, str, str], kind: str, seed: int, world: World, tmp_path_factory
) -> None:
    name, flag, input_kind = case
    folder = tmp_path_factory.mktemp("odd")
    base = BASE_ARGV[name](world, folder / "out")
    original = next((Path(v.removeprefix("path=")) for v in base if v.startswith("path=")), None)
    if input_kind != "data" and flag in base:
        original = Path(base[base.index(flag) + 1])
    elif input_kind != "data":
        original = next((Path(v) for v in base[1:] if Path(v).exists()), world.photo)
    odd = odd_file(kind, original or world.manifest, world, folder, seed)
    argv = _replace_input(base, flag, input_kind, odd)
    if argv is None:
        return
    before = snapshot(*world.inputs())
    outcome = run(argv)
    assert_contract(outcome, argv)
    assert unchanged(before, *world.inputs()), outcome.describe(argv)
    if kind in ("missing", "empty", "garbage", "folder", "fifo", "symlink-loop") and name not in REFUSED_BASES:
        # nothing usable was given where the command needs it: it must say so (a folder of images for classify,
        # an empty texts file ... are refused too; only a truncated or wrong-typed file may still be partly usable)
        if not (name == "classify" and kind == "folder"):
            assert outcome.code == 2, outcome.describe(argv)
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".clipforge-scratch")]
    assert not leftovers, leftovers


def _numeric_cases() -> list[tuple[str, str, type]]:
    cases = []
    for name, parser in sorted(commands().items()):
        for action in parser._actions:
            if action.type in (int, float) and action.option_strings:
                cases.append((name, action.option_strings[0], action.type))
    return cases


NUMBERS = _numeric_cases()
ODD_NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 2**31, 2**63, 10**18, -(10**12)]),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5", "3", "x", ""]),
)


@settings(SETTINGS, max_examples=50)
@given(case=st.sampled_from(NUMBERS), value=ODD_NUMBERS)
def test_any_number_for_any_numeric_flag_is_taken_or_refused_in_one_line(
    case: tuple[str, str, type], value: object, world: World, tmp_path_factory
) -> None:
    name, flag, _ = case
    folder = tmp_path_factory.mktemp("number")
    argv = BASE_ARGV[name](world, folder / "out")
    argv = [*argv[: argv.index(flag)], *argv[argv.index(flag) + 2 :]] if flag in argv else argv
    argv = [*argv, flag, str(value)]
    before = snapshot(*world.inputs())
    outcome = run(argv)
    assert_contract(outcome, argv)
    assert unchanged(before, *world.inputs())


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """Every scalar field of the config schema as (dotted key, annotation)."""
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            found += _leaves(tp, f"{prefix}{field.name}.")
        else:
            found.append((f"{prefix}{field.name}", tp))
    return found


CONFIG_KEYS = [key for key, _ in _leaves(Config) if key not in ("train.output_dir", "data.feature_cache")]
ODD_VALUES = st.one_of(
    st.sampled_from(
        ["0", "-1", "-5", "1e9", "200000", "nan", "inf", "null", "true", "[]", "{}", "''", "x" * 300, "[1, 2, 3]"]
    ),
    st.sampled_from(["mps", "tpu", "cuda:7", "bogus", "-3.5", "1e-30", "100000000000000000000", "&a [*a]"]),
    st.text(max_size=30).map(lambda text: text.replace("\x00", "")),
)


@settings(SETTINGS, max_examples=60)
@given(key=st.sampled_from(CONFIG_KEYS), value=ODD_VALUES)
def test_any_value_for_any_config_key_trains_or_is_refused_in_one_line(
    key: str, value: str, world: World, tmp_path_factory
) -> None:
    folder = tmp_path_factory.mktemp("config")
    argv = [*BASE_ARGV["train"](world, folder), f"{key}={value}"]
    before = snapshot(*world.inputs())
    outcome = run(argv)
    assert_contract(outcome, argv)
    assert unchanged(before, *world.inputs())


@pytest.mark.parametrize(
    "text",
    [
        # an alias bomb: nine levels of ten aliases expand to 10^9 values
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9))
        + "train: {steps: *j}\n",
        "[" * 5000 + "]" * 5000,  # nested deeper than any config
        "train:\n  steps: " + "9" * 2_000_000 + "\n",  # 2 MB: larger than any config
        "\x00\x01\x02 not yaml",
        "train: {steps: 1}\ntrain: {steps: 2}\n" * 3,
    ],
    ids=["alias-bomb", "deep", "huge", "binary", "repeated"],
)
def test_a_hostile_yaml_is_refused_quickly_without_growing(text: str, world: World, tmp_path: Path) -> None:
    config = tmp_path / "hostile.yaml"
    config.write_text(text)
    for argv in (
        ["train", str(config), f"train.output_dir={tmp_path / 'run'}"],
        ["eval", "--checkpoint", str(world.checkpoint), "--task", "retrieval", "--data", str(config)],
        ["data", "inspect", str(config)],
    ):
        outcome = run(argv, deadline_s=30)
        assert_contract(outcome, argv, allowed=(2,))
        assert len(outcome.err) < 2000, "the message echoes too much of the file"


def test_every_command_parses_without_arguments_to_one_usage_error() -> None:
    for name, parser in commands().items():
        if not any(action.required and action.nargs != "*" for action in parser._actions):
            continue  # clipforge demo: runs as it is
        argv = name.split()
        outcome = run(argv)
        assert outcome.code == 2 and not outcome.escaped, outcome.describe(argv)


def test_numbers_and_inputs_cover_every_command_that_takes_them() -> None:
    assert {name for name, _, _ in INPUTS} >= {"eval", "embed", "search", "classify", "explain", "serve"}
    assert {name for name, _, _ in NUMBERS} >= {"index build", "data pack", "embed", "search"}
    assert len(CONFIG_KEYS) > 80


def test_a_fifo_among_the_images_never_hangs_embed(world: World, tmp_path: Path) -> None:
    images = Path(shutil.copytree(world.images, tmp_path / "images"))
    make_fifo(images / "x.png")
    argv = ["embed", "--checkpoint", str(world.checkpoint), "--images", str(images), "--out", str(tmp_path / "emb")]
    outcome = run(argv, deadline_s=60)
    assert_contract(outcome, argv, allowed=(0,))
    failed = (tmp_path / "emb" / "images" / "failed.jsonl").read_text()
    assert "x.png" in failed and "not a regular file" in failed


def test_argparse_usage_errors_are_one_line_too(tmp_path: Path) -> None:
    outcome = run(["search", "--top", "x", "--index", str(tmp_path), "--checkpoint", "c", "--query", "q"])
    assert outcome.code == 2 and not outcome.escaped
    assert [line for line in outcome.err.splitlines() if "error:" in line]


def test_the_parser_declares_paths_for_every_path_like_flag() -> None:
    """A flag that names a file or folder but was added with a plain add_argument escapes the output policy."""
    path_words = ("checkpoint", "out", "grid", "plot", "overlays", "image", "images", "texts", "index", "data")
    for name, parser in commands().items():
        flags = {argument.flag for argument in declared(parser)}
        for action in parser._actions:
            option = next((o for o in action.option_strings if o.startswith("--")), None)
            if option is None or isinstance(action, argparse._StoreTrueAction):
                continue
            if option.removeprefix("--") in path_words and name not in ("index build",):
                assert option in flags, f"{name} {option} is a path: declare it with add_input/add_output"


def test_no_command_leaves_its_temporaries_after_a_failed_write(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the moment of the write: one line naming the file and the fix, exit 2, nothing left."""
    import errno

    from clipforge import io as clipforge_io

    def full(_descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(clipforge_io.os, "fsync", full)
    for name in ("eval", "classify", "explain", "import", "search", "data inspect", "embed"):
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        argv = BASE_ARGV[name](world, folder)
        outcome = run(argv)
        assert_contract(outcome, argv, allowed=(2,))
        assert "No space left on device" in outcome.err and "free some space" in outcome.err, outcome.describe(argv)
        assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
