"""Every command the README shows works as written: each parses, recipes and overrides load, cheap ones run.

The README is read, not copied: a command added to it is checked here without editing this file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from clipforge.cli import build_parser, main
from clipforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    """The fenced code blocks of the README in ``language`` (``""`` = no language given)."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M) if lang == language]


def shell_commands() -> list[str]:
    """Every ``clipforge ...`` command in the README's shell blocks and inline code, continuation lines joined.

    ``torchrun ... -m clipforge <args>`` and ``python -m clipforge <args>`` count as ``clipforge <args>``; a
    command whose arguments are elided (``...``) is left out.
    """
    commands = []
    for block in code_blocks("bash") + code_blocks(""):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip().removeprefix("$ ")
            match = re.search(r"(?:^|-m )clipforge (.*)", line)
            if match and not line.startswith("#"):
                commands.append("clipforge " + match.group(1).strip())
    # inline code: a command with arguments; a bare ``clipforge eval`` names a command (checked below)
    commands += [
        c for c in re.findall(r"`(clipforge [^`]+)`", README) if "--" in c or "=" in c or c == "clipforge demo"
    ]
    return [command for command in dict.fromkeys(commands) if "..." not in command and "<" not in command]


COMMANDS = shell_commands()


def test_the_readme_shows_commands_of_every_kind() -> None:
    shown = {shlex.split(command)[1] for command in COMMANDS}
    assert {"train", "demo", "eval", "data", "embed", "search", "index", "classify", "explain", "serve"} <= shown
    named = set(re.findall(r"`clipforge (\w+)", README))
    assert named <= set(build_parser()._subparsers._group_actions[0].choices)  # every command named exists


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command: str) -> None:
    """Its sub-command and every flag exist (argparse exits 2 on an unknown one)."""
    build_parser().parse_args(shlex.split(command)[1:])


@pytest.mark.parametrize("command", [c for c in COMMANDS if shlex.split(c)[1] == "train" and "--resume" not in c])
def test_every_readme_training_command_loads_its_config(command: str) -> None:
    """The recipe or ``configs/...`` file exists from a fresh clone and every override fits the schema."""
    args = build_parser().parse_args(shlex.split(command)[1:])
    if "batch_szie" in command:  # the README's example of a mistyped key
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        load_config(args.config, args.overrides)


def test_the_readme_mistyped_key_example_prints_what_it_shows(capsys: pytest.CaptureFixture) -> None:
    shown = next(line for line in README.splitlines() if line.startswith("clipforge train: error: unknown config key"))
    assert main(["train", "demo", "train.batch_szie=64"]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith(shown.split("[...]")[0].rstrip(" ["))


def test_the_make_targets_the_readme_names_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {target for target in re.findall(r"`make (\w+)`", README)} <= targets
    assert {"demo", "test"} <= targets


def test_the_python_api_example_runs(tiny_checkpoint: tuple[Path, Path]) -> None:
    checkpoint, _ = tiny_checkpoint
    (example,) = [block for block in code_blocks("python") if "load_checkpoint(" in block]
    namespace: dict = {}
    exec(example.replace("demo-output/run/last.pt", str(checkpoint)), namespace)  # noqa: S102 - the README's own code
    assert namespace["logits"].shape == (2, 2) and namespace["loss"].ndim == 0


def test_the_search_api_example_runs(tiny_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, images = tiny_checkpoint
    assert (
        main(["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "emb")]) == 0
    )
    (example,) = [block for block in code_blocks("python") if "Index.load(" in block]
    query = next(images.glob("*.png"))
    code = example.replace('"photos-emb"', repr(str(tmp_path / "emb"))).replace('"query.jpg"', repr(str(query)))
    namespace: dict = {}
    exec(code.replace("demo-output/run/last.pt", str(checkpoint)), namespace)  # noqa: S102 - the README's own code
    assert len(namespace["similar"]) == 5
