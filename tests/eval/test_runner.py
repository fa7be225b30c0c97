"""Evaluation runs whose answers are known: hand-made towers on solid-colour images the tests write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from clipforge.config import EVAL_METRICS, DataConfig
from clipforge.data.manifest import ManifestSource
from clipforge.data.sources import build_source
from clipforge.eval.results import benchmark_record, format_results_table, write_results_json
from clipforge.eval.runner import classnames_from_file, evaluate_retrieval, evaluate_zeroshot, open_eval_source
from clipforge.train.evaluation import ClassifierCache
from clipforge.viz import plot_confusion_matrix
from tests.eval.handmade import COLOURS, colour_model, colour_processor, write_colour_set

CLASSES = sorted(COLOURS)  # a manifest numbers string labels in sorted order


def run_zeroshot(manifest: Path, source=None, **kwargs):
    source = source or ManifestSource(manifest)
    return evaluate_zeroshot(colour_model(), colour_processor(), source, batch_size=5, **kwargs)


def test_zeroshot_on_solid_colours_is_exact(tmp_path: Path) -> None:
    result = run_zeroshot(write_colour_set(tmp_path, per_class=2), templates=["a photo of a {}.", "a {} thing"])
    assert result.metrics == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert result.confusion_matrix == [[2 if row == column else 0 for column in range(6)] for row in range(6)]
    assert result.classnames == CLASSES
    assert (result.num_images, result.skipped_images) == (12, 0)
    assert set(result.metrics) == set(EVAL_METRICS["zeroshot"])


def test_zeroshot_on_an_image_folder(tmp_path: Path) -> None:
    write_colour_set(tmp_path, per_class=2)  # tmp_path/<colour>/<k>.png: classes are the folder names
    source = build_source(DataConfig(kind="imagefolder", path=str(tmp_path)))
    result = run_zeroshot(tmp_path, source=source)
    assert result.metrics["acc1"] == 1.0 and result.classnames == CLASSES and result.num_images == 12


def test_zeroshot_with_swapped_labels_scores_what_the_swap_implies(tmp_path: Path) -> None:
    # red images labelled green and green ones red: the model still answers the true colour, so exactly the
    # 4 untouched classes of 6 are right; those two classes are each other's only confusion
    manifest = write_colour_set(tmp_path, per_class=3, labels={"red": "green", "green": "red"})
    result = run_zeroshot(manifest)
    assert result.metrics["acc1"] == pytest.approx(4 / 6)
    assert result.metrics["mean_per_class_recall"] == pytest.approx(4 / 6)
    red, green = CLASSES.index("red"), CLASSES.index("green")
    assert result.confusion_matrix[red][green] == 3 and result.confusion_matrix[green][red] == 3
    # red and green share no channel: a red image scores 0 for green, tied with blue and cyan, and the
    # pessimistic tie rule ranks the true class behind every tie: rank 6 of 6, outside the top 5
    assert result.metrics["acc5"] == pytest.approx(4 / 6)


def test_zeroshot_names_what_is_missing(tmp_path: Path) -> None:
    unlabelled = write_colour_set(tmp_path / "plain", label_column=False)
    with pytest.raises(ValueError, match="needs class labels"):
        run_zeroshot(unlabelled)
    numbered = write_colour_set(tmp_path / "numbers", labels={name: str(i) for i, name in enumerate(COLOURS)})
    with pytest.raises(ValueError, match="class names"):
        run_zeroshot(numbered)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(COLOURS) + "\n\n")
    names = classnames_from_file(ManifestSource(numbered), str(names_file), "manifest")
    result = run_zeroshot(numbered, classnames=names)
    assert result.metrics["acc1"] == 1.0 and result.classnames == list(COLOURS)
    with pytest.raises(ValueError, match="2 class names"):
        run_zeroshot(numbered, classnames=["red", "green"])


def test_retrieval_skips_unreadable_images_with_their_captions(tmp_path: Path) -> None:
    manifest = write_colour_set(tmp_path, per_class=1)
    (tmp_path / "cyan" / "0.png").write_bytes(b"\x89PNG broken")
    result = evaluate_retrieval(colour_model(), colour_processor(), ManifestSource(manifest), batch_size=4)
    assert (result.num_images, result.skipped_images) == (5, 1)
    assert (result.num_captions, result.skipped_captions) == (10, 2)
    assert set(result.metrics) == set(EVAL_METRICS["retrieval"])
    for direction in ("image", "text"):
        assert result.metrics[f"{direction}_retrieval_recall@1"] == 1.0
        assert result.metrics[f"{direction}_retrieval_mean_rank"] == 1.0
    embeddings = result.embeddings
    assert embeddings.text_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert "cyan" not in " ".join(embeddings.captions)
    assert "cyan" in result.skipped[0].where


def test_results_json_has_the_clip_benchmark_layout(tmp_path: Path) -> None:
    result = run_zeroshot(write_colour_set(tmp_path, per_class=1))
    record = benchmark_record(result, "manifest:colours.csv", "vit-p8", "run/last.pt")
    path = write_results_json(tmp_path / "out" / "results.json", record)
    written = json.loads(path.read_text())
    assert written == {
        "dataset": "manifest:colours.csv",
        "model": "vit-p8",
        "pretrained": "run/last.pt",
        "task": "zeroshot_classification",
        "metrics": {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0},
        "language": "en",
    }
    assert list(written) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    retrieval = evaluate_retrieval(colour_model(), colour_processor(), ManifestSource(tmp_path / "colours.csv"))
    record = benchmark_record(retrieval, "d", "m", "p")
    assert record["task"] == "zeroshot_retrieval"
    assert all(isinstance(value, float) for value in record["metrics"].values())
    table = format_results_table(result, "manifest:colours.csv", "run/last.pt")
    assert "acc1" in table and "6 images, 6 classes" in table


def test_acc5_is_nan_below_five_classes_as_clip_benchmark_writes_it(tmp_path: Path) -> None:
    three = ["red", "green", "blue"]
    manifest = write_colour_set(tmp_path, per_class=1)
    rows = [
        line for line in manifest.read_text().splitlines() if line.startswith("image") or line.split(",")[2] in three
    ]
    manifest.write_text("\n".join(rows) + "\n")
    result = run_zeroshot(manifest)
    assert "acc5" not in result.metrics  # the library leaves top-5 of 3 classes out; the JSON writes NaN
    path = write_results_json(tmp_path / "r.json", benchmark_record(result, "d", "m", "p"))
    assert '"acc5": NaN' in path.read_text()
    written = json.loads(path.read_text())
    assert list(written["metrics"]) == ["acc1", "acc5", "mean_per_class_recall"] and math.isnan(
        written["metrics"]["acc5"]
    )


def test_plot_confusion_matrix_writes_a_png(tmp_path: Path) -> None:
    path = plot_confusion_matrix([[2, 1], [0, 3]], ["cat", "dog"], tmp_path / "confusion.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="2 x 2"):
        plot_confusion_matrix([[1, 2, 3]], ["cat", "dog"], tmp_path / "bad.png")


def test_classifier_cache_holds_one_step() -> None:
    cache, calls = ClassifierCache(), []

    def build() -> torch.Tensor:
        calls.append(1)
        return torch.eye(2)

    cache.get(1, ["a", "b"], ["{}"], build)
    cache.get(1, ["a", "b"], ["{}"], build)  # a second task over the same classes: no new encoding
    assert len(calls) == 1
    cache.get(1, ["a", "c"], ["{}"], build)
    cache.get(2, ["a", "b"], ["{}"], build)  # the next step's weights: encoded again
    assert len(calls) == 3 and cache.builds == 3


def test_classnames_from_a_file_list_or_mapping(tmp_path: Path) -> None:
    numbered = ManifestSource(write_colour_set(tmp_path, labels={name: str(i) for i, name in enumerate(COLOURS)}))
    (tmp_path / "list.json").write_text(json.dumps(list(COLOURS)))
    (tmp_path / "map.json").write_text(json.dumps({str(i): name for i, name in enumerate(COLOURS)}))
    assert classnames_from_file(numbered, str(tmp_path / "list.json"), "manifest") == list(COLOURS)
    assert classnames_from_file(numbered, str(tmp_path / "map.json"), "manifest") == list(COLOURS)
    (tmp_path / "short.json").write_text('["red"]')
    with pytest.raises(ValueError, match="1 names but the data has 6 classes"):
        classnames_from_file(numbered, str(tmp_path / "short.json"), "manifest")
    with pytest.raises(FileNotFoundError):
        classnames_from_file(numbered, str(tmp_path / "missing.txt"), "manifest")
    unlabelled = ManifestSource(write_colour_set(tmp_path / "plain", label_column=False))
    with pytest.raises(ValueError, match="needs class labels"):
        classnames_from_file(unlabelled, str(tmp_path / "list.json"), "manifest")


def test_shards_are_indexed_for_evaluation(tmp_path: Path) -> None:
    from tests.data.shard_helpers import shapes_samples, write_shards

    spec = write_shards(tmp_path, shapes_samples()[:4], shard_size=2)
    source = open_eval_source(DataConfig(kind="webdataset", path=spec))
    assert len(source) == 4 and source.captions(3) == ["a large red square"]
    assert source.labels.tolist() == [0, 0, 0, 0]
    assert len(open_eval_source(DataConfig(kind="manifest", path=str(write_colour_set(tmp_path / "c"))))) == 12
