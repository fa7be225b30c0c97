"""The same model and files give the same metrics in clipforge and in the installed CLIP_benchmark.

CLIP_benchmark runs its own dataset builders, data loaders and metric code on a clipforge model
(``benchmark_side.BenchmarkModel``); clipforge runs ``clipforge eval`` (or its library) on the same files: STL-10's
binary layout (zero-shot, linear and few-shot probes), COCO's captions layout (retrieval under both tie rules) and
CLIP_benchmark's ``wds_<name>/`` WebDataset folders (zero-shot and retrieval).
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.cli import main
from clipforge.config import DataConfig
from clipforge.eval.runner import evaluate_retrieval, open_eval_source
from clipforge.interop.load import from_pretrained
from tests.conftest import COLOURS as SHAPE_COLOURS
from tests.conftest import SHAPES, SIZES, draw_shape
from tests.eval.benchmark_side import (
    STL10_CLASSES,
    BenchmarkModel,
    allow_fake_stl10,
    benchmark_tokenizer,
    colour_images,
    write_coco,
    write_stl10,
    write_wds,
)
from tests.eval.handmade import COLOURS, colour_model, colour_processor

pytest.importorskip("clip_benchmark")
BENCHMARK_DATA = files("clip_benchmark") / "datasets"
TEMPLATES_JSON = str(BENCHMARK_DATA / "en_zeroshot_classification_templates.json")


def shapes() -> list[tuple[str, str, str]]:
    return [(colour, shape, size) for colour in SHAPE_COLOURS for shape in SHAPES for size in SIZES]


def clipforge_metrics(argv: list[str], out: Path) -> dict:
    assert main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())["metrics"]


def benchmark_loader(dataset, batch_size: int = 16, collate_fn=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> tuple[Path, BenchmarkModel, object]:
    """(checkpoint, the model as CLIP_benchmark calls it, its processor)."""
    checkpoint, _ = tiny_checkpoint
    loaded = from_pretrained(checkpoint, "cpu")
    return checkpoint, BenchmarkModel(loaded.model).eval(), loaded.processor


def test_zeroshot_on_stl10_files_equals_clip_benchmark(
    tiny, clip_benchmark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    checkpoint, model, processor = tiny
    allow_fake_stl10(monkeypatch)
    labels = [label for label in range(10) for _ in range(4)]
    write_stl10(tmp_path, "test", labels, spread=30, seed=0)
    # readable names of our own, in CLIP_benchmark's {dataset: [names]} layout, given to both frameworks
    names = tmp_path / "classnames.json"
    names.write_text(json.dumps({"stl10": [f"{name} picture" for name in STL10_CLASSES]}))
    dataset = build_dataset("stl10", root=str(tmp_path), transform=processor.image_transform(), split="test",
                            custom_classname_file=str(names))  # fmt: skip
    assert dataset.classes[0] == "airplane picture"
    theirs = zeroshot_classification.evaluate(
        model, benchmark_loader(dataset), benchmark_tokenizer(processor), dataset.classes, dataset.templates, "cpu",
        amp=False,
    )  # fmt: skip
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "zeroshot", "--data", "kind=torchvision", "name=STL10",
            f"path={tmp_path}", "split=test", "--classnames", f"{names}:stl10",
            "--templates", f"{TEMPLATES_JSON}:stl10"]  # fmt: skip
    for ties in ("pessimistic", "index"):
        ours = clipforge_metrics([*argv, "--ties", ties], tmp_path / f"{ties}.json")
        assert ours["acc1"] == theirs["acc1"] and ours["acc5"] == theirs["acc5"], (ties, ours, theirs)
        assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert 0 < theirs["acc5"] < 1  # neither trivial nor perfect: the comparison can fail


def coco_set(folder: Path) -> Path:
    """The 24 shapes, two distinct captions each, in COCO's layout."""
    images = [draw_shape(colour, shape, size) for colour, shape, size in shapes()]
    captions = [[f"a {size} {colour} {shape}", f"{colour} {shape}, {size}"] for colour, shape, size in shapes()]
    return write_coco(folder, images, captions)


def benchmark_retrieval(root: Path, annotations: Path | None, model, processor, ks: list[int], name: str) -> dict:
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval

    dataset = build_dataset(
        name, root=str(root), transform=processor.image_transform(), split="test",
        annotation_file=str(annotations) if annotations else None, task="zeroshot_retrieval",
    )  # fmt: skip
    if name.startswith("wds/"):
        loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, shuffle=False)
    else:
        loader = benchmark_loader(dataset, 8, get_dataset_collate_fn(name))
    return zeroshot_retrieval.evaluate(
        model, loader, benchmark_tokenizer(processor), "cpu", amp=False, recall_k_list=ks
    )


def test_retrieval_on_coco_files_equals_clip_benchmark_under_both_tie_rules(
    tiny, clip_benchmark, tmp_path: Path
) -> None:
    checkpoint, model, processor = tiny
    annotations = coco_set(tmp_path)
    theirs = benchmark_retrieval(tmp_path, annotations, model, processor, [1, 5, 10], "mscoco_captions")
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", "--data", "kind=coco",
            f"path={annotations}", f"image_root={tmp_path / 'val2014'}"]  # fmt: skip
    for ties in ("pessimistic", "index"):
        ours = clipforge_metrics([*argv, "--ties", ties], tmp_path / f"{ties}.json")
        for key, value in theirs.items():  # theirs is a float32 mean of 0/1 hits: equal to 1e-7, on a 1/48 grid
            assert ours[key] == pytest.approx(value, abs=1e-6), (ties, key, ours[key], value)
    assert 0 < theirs["image_retrieval_recall@1"] < 1 and 0 < theirs["text_retrieval_recall@5"] < 1


def test_tied_retrieval_follows_clip_benchmark_under_the_index_rule(clip_benchmark, tmp_path: Path) -> None:
    """Solid colours, 11 identical images per colour sharing their two captions: every caption ties exactly with
    the 10 other images of its colour, every image with the 20 other captions of its colour (the hand-made model
    is exact whatever the batch). torch.topk(1) over 66 images or 132 captions returns the first of the tied
    maxima, so CLIP_benchmark's R@1 is the index rule's, and the pessimistic rule counts every tie as a miss.
    (Beyond k = 1 PyTorch promises no order among equal values, so R@5 under ties is not compared.)"""
    names = list(COLOURS)
    order = [names[position % len(names)] for position in range(66)]  # colours interleaved, so ties span batches
    images = [colour_images([0], np.array([COLOURS[name]], dtype=np.float64), 0, 0)[0] for name in order]
    from PIL import Image

    pictures = [Image.fromarray(pixels) for pixels in images]
    annotations = write_coco(tmp_path, pictures, [[f"a {name} square", f"something {name}"] for name in order])
    model, processor = colour_model(), colour_processor()
    theirs = benchmark_retrieval(tmp_path, annotations, BenchmarkModel(model), processor, [1], "mscoco_captions")
    source = open_eval_source(DataConfig(kind="coco", path=str(annotations), image_root=str(tmp_path / "val2014")))
    index = evaluate_retrieval(model, processor, source, batch_size=8, ties="index").metrics
    pessimistic = evaluate_retrieval(model, processor, source, batch_size=8, ties="pessimistic").metrics
    for direction in ("image", "text"):
        key = f"{direction}_retrieval_recall@1"
        assert index[key] == pytest.approx(theirs[key], abs=1e-6) and index[key] == pytest.approx(1 / 11), key
        assert pessimistic[key] == 0.0


def test_wds_folders_give_clip_benchmarks_zeroshot_and_retrieval(tiny, clip_benchmark, tmp_path: Path) -> None:
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    checkpoint, model, processor = tiny
    classes = [f"{colour} {shape}" for colour in SHAPE_COLOURS for shape in SHAPES]
    samples = [
        {"image": draw_shape(colour, shape, size), "label": classes.index(f"{colour} {shape}")}
        for colour, shape, size in shapes()
    ]
    templates = ["a photo of a {c}.", "a drawing of a {c}."]
    classification = write_wds(tmp_path / "wds_shapes", samples, 7, classnames=classes, templates=templates)
    dataset = build_dataset("wds/shapes", root=str(classification), transform=processor.image_transform(),
                            split="test", task="zeroshot_classification")  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, shuffle=False)
    theirs = zeroshot_classification.evaluate(
        model, loader, benchmark_tokenizer(processor), dataset.classes, dataset.templates, "cpu", amp=False
    )
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "zeroshot", "--data", "kind=webdataset",
            f"path={classification}"]  # fmt: skip
    ours = clipforge_metrics(argv, tmp_path / "zeroshot.json")
    assert (ours["acc1"], ours["acc5"]) == (theirs["acc1"], theirs["acc5"])
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert json.loads((tmp_path / "zeroshot.json").read_text())["dataset"] == "wds/shapes"

    captioned = [  # two captions a sample, one a line of its .txt member
        {
            "image": draw_shape(colour, shape, size),
            "captions": [f"a {size} {colour} {shape}", f"{colour} {shape}, {size}"],
        }
        for colour, shape, size in shapes()
    ]
    retrieval = write_wds(tmp_path / "wds_shapes_captions", captioned, 5, retrieval=True)
    theirs = benchmark_retrieval(retrieval, None, model, processor, [1, 5, 10], "wds/shapes_captions")
    argv = ["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", "--data", "kind=webdataset",
            f"path={retrieval}"]  # fmt: skip
    ours = clipforge_metrics(argv, tmp_path / "retrieval.json")
    assert json.loads((tmp_path / "retrieval.json").read_text())["dataset"] == "wds/shapes_captions"
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_clip_benchmark_build_reads_clipforge_results(tiny, clip_benchmark, tmp_path: Path) -> None:
    import argparse
    import csv

    from clip_benchmark.cli import main_build

    checkpoint, _, _ = tiny
    annotations = coco_set(tmp_path / "coco")
    folder = tmp_path / "results"
    base = ["eval", "--checkpoint", str(checkpoint), "--out-dir", str(folder)]
    coco = ["kind=coco", f"path={annotations}", f"image_root={annotations.parent / 'val2014'}"]
    assert main([*base, "--task", "retrieval", "--data", *coco]) == 0
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("image,caption,label\n" + "".join(
        f"coco/val2014/COCO_val2014_{n:012d}.png,x,{colour}\n" for n, (colour, _, _) in enumerate(shapes(), start=1)
    ))  # fmt: skip
    assert main([*base, "--task", "zeroshot", "--data", "kind=manifest", f"path={labelled}"]) == 0
    assert len(list(folder.glob("*.json"))) == 2
    output = tmp_path / "benchmark.csv"
    main_build(argparse.Namespace(files=[str(folder)], output=str(output)))
    rows = list(csv.DictReader(output.open()))
    assert sorted(row["task"] for row in rows) == ["zeroshot_classification", "zeroshot_retrieval"]
    for row in rows:
        assert row["model_fullname"] == f"{row['model']} {checkpoint}" and row["language"] == "en"
    zeroshot = next(row for row in rows if row["task"] == "zeroshot_classification")
    assert math.isnan(float(zeroshot["acc5"]))  # 4 colour classes: CLIP_benchmark writes NaN, and so do we
    assert 0 <= float(zeroshot["acc1"]) <= 1


# ----------------------------------------------------------------------------------------------
# Linear probes
# ----------------------------------------------------------------------------------------------
SEEDS = (0, 1, 2)


def probe_files(root: Path) -> None:
    """STL-10 train (12 per class) and test (12 per class) images, colours overlapping between neighbouring
    classes, so the probe is neither perfect nor at chance."""
    write_stl10(root, "train", [label for label in range(10) for _ in range(12)], spread=70, seed=1)
    write_stl10(root, "test", [label for label in range(10) for _ in range(12)], spread=70, seed=2)


def benchmark_probe(root: Path, processor, fewshot_k: int, seed: int, features: Path) -> dict:
    """CLIP_benchmark's linear probe as its command line runs it with --val_proportion 0.2 --fewshot_epochs 100
    (its default 10 epochs of AdamW, 20 steps on these 96 images, stop far from the optimum)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import linear_probe

    transform = processor.image_transform()
    torch.manual_seed(seed)
    train = build_dataset("stl10", root=str(root), transform=transform, split="train", task="linear_probe")
    test = build_dataset("stl10", root=str(root), transform=transform, split="test", task="linear_probe")
    train, validation = torch.utils.data.random_split(train, [0.8, 0.2])
    return linear_probe.evaluate(
        BenchmarkModel(colour_model()), benchmark_loader(train, 64), benchmark_loader(test, 64), fewshot_k, 64, 0,
        0.1, 100, f"colour-{seed}", seed, str(features), "cuda", val_dataloader=benchmark_loader(validation, 64),
        amp=False, verbose=False,
    )  # fmt: skip


@pytest.mark.parametrize("shots", [None, 3])
def test_linear_probe_is_within_clip_benchmarks_run_to_run_spread(
    shots, clip_benchmark, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clipforge.eval.probe import evaluate_linear_probe

    allow_fake_stl10(monkeypatch)
    probe_files(tmp_path)
    processor = colour_processor()
    theirs = [benchmark_probe(tmp_path, processor, shots or -1, seed, tmp_path / "features") for seed in SEEDS]
    test = open_eval_source(DataConfig(kind="torchvision", name="STL10", path=str(tmp_path), split="test"))
    train = open_eval_source(DataConfig(kind="torchvision", name="STL10", path=str(tmp_path), split="train"))
    ours = [
        evaluate_linear_probe(colour_model(), processor, train, test, shots=shots, seed=seed, batch_size=64).metrics
        for seed in SEEDS
    ]
    for key in ("lp_acc1", "lp_mean_per_class_recall"):
        their_values = [run[key] for run in theirs]
        our_values = [run[key] for run in ours]
        spread = max(their_values) - min(their_values)
        # within their spread, widened by 3 test images (of 120) for the two solvers' different optima
        margin = max(spread, 3 / 120)
        assert abs(np.mean(our_values) - np.mean(their_values)) <= margin, (key, our_values, their_values)
        assert min(our_values) > 0.3  # well above chance (0.1): the comparison is between working probes
    assert all(math.isnan(run["lp_acc5"]) is False for run in ours)  # 10 classes: acc5 is reported
