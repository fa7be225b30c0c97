"""The demo end to end, shrunk to seconds: it trains, evaluates the held-out split and draws its pictures."""

import json
from pathlib import Path

import pytest

from clipforge.demo import format_report, run_demo

TINY = [
    "train.steps=6",
    "train.batch_size=32",
    "model.image.width=32",
    "model.image.depth=1",
    "model.image.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.text.tokenizer.vocab_size=400",
    "data.num_workers=0",
    "logging.progress=false",
    "logging.tensorboard=false",
]


def test_demo_reports_held_out_figures_with_chance_and_writes_pictures(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = run_demo(tmp_path, TINY, eval_split="val")
    for name in ("loss_curve", "retrieval_grid"):
        assert report.files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.files[name].stat().st_size > 10_000
    assert report.chance["text_to_image_R@5"] == pytest.approx(5 / 235)  # the val split holds 235 emoji
    assert report.chance["group_zeroshot_top1"] == pytest.approx(1 / 9)
    assert 0 <= report.metrics["group_zeroshot_mean_per_class_recall"] <= 1
    saved = json.loads(report.files["results"].read_text())
    assert saved["split"] == "val" and saved["metrics"] == report.metrics
    printed = capsys.readouterr().out
    assert "text_to_image_R@5" in printed and "x chance" in printed and "235 emoji" in printed


def test_report_puts_each_figure_beside_its_chance() -> None:
    text = format_report(
        {"text_to_image_R@5": 0.2}, {"text_to_image_R@5": 0.02, "group_zeroshot_top1_majority": 0.36}, "test", 100
    )
    assert "0.200" in text and "0.020" in text and "10.0" in text
