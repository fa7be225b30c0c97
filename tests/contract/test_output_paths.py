"""Class 1 of the promises: no command writes over one of its inputs, or over an existing file unasked.

Found from the outside: the output arguments are read off every command's parser (``add_output``), so a new
command's outputs are covered without naming them here. Generated cases: for each (command, output argument),
the target is one of the command's own inputs, an existing unrelated file, or either reached through a symlink,
a hard link or a path with ``..`` in it, with and without ``--overwrite``. The contract: exit code 2, one line
naming the path, every input byte-identical and the existing file untouched; with ``--overwrite`` an unrelated
file is replaced, an input never.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract.conftest import BASE_ARGV, REFUSED_BASES, World
from tests.contract.harness import assert_contract, commands, declared, run, snapshot, unchanged

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same cases on every run and machine; the seed is the test's name
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_every_command_has_a_base_command_line() -> None:
    assert set(commands()) == set(BASE_ARGV), "add the new command's valid command line to BASE_ARGV"


@pytest.mark.parametrize("name", sorted(BASE_ARGV))
def test_each_base_command_line_keeps_the_contract(name: str, world: World, tmp_path: Path) -> None:
    """The starting point of every generated case: it succeeds (or is refused on purpose) and changes no input."""
    argv = BASE_ARGV[name](world, tmp_path)
    before = snapshot(*world.inputs())
    outcome = run(argv)
    assert_contract(outcome, argv, allowed=(2,) if name in REFUSED_BASES else (0, 2))
    if name not in REFUSED_BASES and name != "export hf":  # the tiny model may have no transformers counterpart
        assert outcome.code == 0, outcome.describe(argv)
    assert snapshot(*world.inputs()) == before


def _output_cases() -> list[tuple[str, str, str]]:
    """(command, output flag, kind) of every declared output of every command."""
    cases = []
    for name, parser in sorted(commands().items()):
        for argument in declared(parser):
            if argument.role == "output":
                cases.append((name, argument.flag, argument.kind))
    return cases


OUTPUTS = _output_cases()


def test_the_commands_that_write_declare_their_outputs() -> None:
    writers = {name for name, _, _ in OUTPUTS}
    assert {"eval", "search", "classify", "explain", "import", "export onnx", "export hf", "data pack"} <= writers
    assert {"data inspect", "embed"} <= writers


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced by ``value`` (added when absent; a positional is found by name)."""
    argv = list(argv)
    if flag.startswith("--"):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv
    # the positional output of data pack is its last word
    argv[-1] = value
    return argv


def _spell(path: Path, how: str, folder: Path) -> str:
    """Another name of ``path``: itself, via a symlink, a hard link (files only), or with ``..`` in it."""
    if how == "symlink":
        link = folder / f"link-{path.name}"
        link.symlink_to(path)
        return str(link)
    if how == "hardlink" and path.is_file():
        link = folder / f"hard-{path.name}"
        os.link(path, link)
        return str(link)
    if how == "dotdot":
        return str(path.parent / ".." / path.parent.name / path.name)
    return str(path)


@SETTINGS
@given(
    case=st.sampled_from(OUTPUTS),
    target=st.sampled_from(["checkpoint", "manifest", "photo", "data_yaml", "texts", "images", "store"]),
    how=st.sampled_from(["plain", "symlink", "hardlink", "dotdot"]),
    overwrite=st.booleans(),
)
def test_an_output_that_is_an_input_is_refused(
    case: tuple[str, str, str], target: str, how: str, overwrite: bool, world: World, tmp_path_factory
) -> None:
    name, flag, kind = case
    folder = tmp_path_factory.mktemp("out-is-input")
    base = BASE_ARGV[name](world, folder)
    path = getattr(world, target)
    argv = _set(base, flag, _spell(path, how, folder)) + (["--overwrite"] if overwrite else [])
    reads = {str(value) for value in base}
    if str(path) not in reads and not (target == "manifest" and any(str(path) in v for v in base)):
        # not an input of this command line: then it is an existing file or folder, refused without --overwrite
        if overwrite:
            return  # replacing an existing file when asked to is allowed (test_overwrite_replaces_...)
    before = snapshot(*world.inputs(), world.store)
    outcome = run(argv)
    assert_contract(outcome, argv, allowed=(2,) if kind != "folder" else (0, 2))
    assert unchanged(before, *world.inputs(), world.store), outcome.describe(argv)
    if outcome.code == 2:
        said = ("inputs", "exists already", "holds", "is a file", "not a folder", "not an empty folder")
        assert any(words in outcome.err for words in said), outcome.describe(argv)


@SETTINGS
@given(case=st.sampled_from([case for case in OUTPUTS if case[2] != "folder"]), overwrite=st.booleans())
def test_an_existing_file_is_replaced_only_with_overwrite(
    case: tuple[str, str, str], overwrite: bool, world: World, tmp_path_factory
) -> None:
    name, flag, _ = case
    folder = tmp_path_factory.mktemp("existing")
    existing = folder / ("taken.png" if "plot" in flag or "grid" in flag or name == "explain" else "taken.out")
    existing.write_bytes(b"someone's file")
    argv = _set(BASE_ARGV[name](world, folder), flag, str(existing)) + (["--overwrite"] if overwrite else [])
    outcome = run(argv)
    assert_contract(outcome, argv)
    if not overwrite:
        assert outcome.code == 2, outcome.describe(argv)
        assert "exists already" in outcome.err and "--overwrite" in outcome.err
        assert existing.read_bytes() == b"someone's file"
    elif outcome.code == 0:
        assert existing.read_bytes() != b"someone's file"
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


@pytest.mark.parametrize("name", ["classify", "search", "eval", "explain", "data inspect"])
def test_a_picture_output_needs_a_picture_suffix(name: str, world: World, tmp_path: Path) -> None:
    flag = next(f for n, f, kind in OUTPUTS if n == name and kind == "picture")
    argv = _set(BASE_ARGV[name](world, tmp_path), flag, str(tmp_path / "x.pt"))
    outcome = run(argv)
    assert_contract(outcome, argv, allowed=(2,))
    assert ".png" in outcome.err and not (tmp_path / "x.pt").exists()


def test_a_hand_written_config_in_the_run_folder_is_never_replaced(world: World, tmp_path: Path) -> None:
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    mine = run_folder / "config.yaml"
    shutil.copyfile(world.train_yaml, mine)
    for extra in ([], ["--overwrite"]):
        argv = ["train", str(mine), f"train.output_dir={run_folder}", *extra]
        outcome = run(argv)
        assert_contract(outcome, argv, allowed=(2,))
        assert "config.yaml that clipforge did not write" in outcome.err
        assert mine.read_bytes() == world.train_yaml.read_bytes()


def test_the_run_config_of_a_resumed_run_is_its_own_and_may_be_rewritten(world: World, tmp_path: Path) -> None:
    """``clipforge train run/config.yaml --resume latest``: the documented way to continue a run."""
    run_folder = tmp_path / "run"
    first = ["train", str(world.train_yaml), f"train.output_dir={run_folder}"]
    assert run(first).code == 0
    again = ["train", str(run_folder / "config.yaml"), "train.steps=3", "--resume", "latest"]
    outcome = run(again)
    assert_contract(outcome, again, allowed=(0,))
    assert "steps: 3" in (run_folder / "config.yaml").read_text()
