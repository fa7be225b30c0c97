"""``clipforge explain``: a figure of every (image, text) heat map, overlays on request, clear input errors."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from clipforge.cli import main


def test_explain_writes_one_map_per_image_and_text(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint, images = tiny_checkpoint
    figure, overlays = tmp_path / "explain.png", tmp_path / "overlays"
    argv = ["explain", "--checkpoint", str(checkpoint), "--out", str(figure), "--overlays", str(overlays)]
    argv += ["--image", str(images / "large_red_circle.png"), str(images / "small_blue_square.png")]
    assert main([*argv, "--text", "a red circle", "--text", "a blue square"]) == 0
    assert "attention-gradient" in capsys.readouterr().out
    assert Image.open(figure).size[0] > 500
    written = sorted(p.name for p in overlays.iterdir())
    assert written == [f"{stem}__{n}.png" for stem in ("large_red_circle", "small_blue_square") for n in (0, 1)]
    assert Image.open(overlays / written[0]).size == (32, 32)


def test_explain_reports_a_missing_image_or_a_wrong_method(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    checkpoint, images = tiny_checkpoint
    base = ["explain", "--checkpoint", str(checkpoint), "--text", "a dog", "--out", str(tmp_path / "e.png")]
    assert main([*base, "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main([*base, "--image", str(images / "large_red_circle.png"), "--method", "gradcam"]) == 2
    assert "not a CNN" in capsys.readouterr().err
