"""``clipforge eval`` end to end, on a checkpoint trained for a few steps on the shapes the tests draw."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.data.manifest import ManifestSource
from clipforge.train.loop import train
from tests.conftest import tiny_config, write_shapes_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval_cli")
    shapes = write_shapes_manifest(folder / "shapes")
    result = train(tiny_config(shapes, folder / "run", train={"steps": 2, "batch_size": 8}))
    # the same images as a classification set: 12 classes "<colour> <shape>", 2 sizes each
    source = ManifestSource(shapes)
    labelled = shapes.parent / "labelled.csv"
    with labelled.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        for index in range(len(source)):
            relative = Path(source.describe(index)).relative_to(shapes.parent)
            _, colour, shape = relative.stem.split("_")
            writer.writerow([relative.as_posix(), source.captions(index)[0], f"{colour} {shape}"])
    return {"checkpoint": result.checkpoint, "shapes": shapes, "labelled": labelled, "folder": folder}


def test_zeroshot_writes_table_json_and_confusion_matrix(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "results.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(trained["checkpoint"]),
            "--task",
            "zeroshot",
            "--data",
            "kind=manifest",
            f"path={trained['labelled']}",
            "--templates",
            "cifar10",
            "--out",
            str(out),
            "--plot",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "zeroshot_classification" in printed and "24 images, 12 classes" in printed and "acc1" in printed
    written = json.loads(out.read_text())
    assert list(written) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert written["task"] == "zeroshot_classification" and written["pretrained"] == str(trained["checkpoint"])
    assert written["model"] == "vit-p8-w48-d2-32px+transformer-w48-d2" and written["language"] == "en"
    assert written["dataset"] == f"manifest:{trained['labelled']}"  # a manifest has no splits to name
    assert set(written["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert all(0.0 <= value <= 1.0 for value in written["metrics"].values())
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_retrieval_from_a_yaml_data_file_with_overrides(
    trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data_file = tmp_path / "data.yaml"
    data_file.write_text(f"data:\n  kind: manifest\n  path: {trained['shapes']}\n  caption_column: nothing\n")
    grid, out = tmp_path / "grid.png", tmp_path / "retrieval.json"
    code = main(
        [
            "eval",
            "--checkpoint",
            str(trained["checkpoint"]),
            "--task",
            "retrieval",
            "--data",
            str(data_file),
            "caption_column=caption",  # the override wins over the file's
            "--out",
            str(out),
            "--plot",
            str(grid),
            "--batch-size",
            "7",
        ]
    )
    assert code == 0
    assert "24 images, 48 captions" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["task"] == "zeroshot_retrieval" and written["dataset"] == f"manifest:{trained['shapes']}"
    for direction in ("image", "text"):
        for k in (1, 5, 10):
            assert 0.0 <= written["metrics"][f"{direction}_retrieval_recall@{k}"] <= 1.0
    assert grid.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--checkpoint", "{folder}/missing.pt", "--task", "retrieval"], "does not exist"),
        (["--task", "zeroshot"], "needs class labels"),
        (["--task", "zeroshot", "--data", "kind=manifest", "path={labelled}", "--templates", "nope"], "--templates"),
        (["--task", "zeroshot", "--data", "kind=manifest", "path={labelled}", "--classnames", "x.txt"], "--classnames"),
        (["--task", "retrieval", "--data", "kind=manifest", "pth={shapes}"], "did you mean 'data.path'"),
        (["--task", "retrieval", "--data", "kind=manifest", "path={folder}/none.csv"], "does not exist"),
        (["--task", "retrieval", "--data", "{folder}/none.yaml"], "neither a YAML file nor key=value"),
    ],
)
def test_input_mistakes_exit_2_with_a_message(
    trained: dict[str, Path], capsys: pytest.CaptureFixture, arguments: list[str], message: str
) -> None:
    arguments = [argument.format(**{key: str(value) for key, value in trained.items()}) for argument in arguments]
    command = ["eval", *arguments]
    if "--checkpoint" not in arguments:
        command += ["--checkpoint", str(trained["checkpoint"])]
    if "--data" not in arguments:
        command += ["--data", "kind=manifest", f"path={trained['shapes']}"]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_probes_from_the_command_line(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    labelled = str(trained["labelled"])
    base = ["eval", "--checkpoint", str(trained["checkpoint"]), "--data", "kind=manifest", f"path={labelled}"]
    out = tmp_path / "results"
    # the probe's training data: fields over --data's (here the same file: only what is measured is checked)
    assert main([*base, "--task", "linear_probe", "--train-data", f"path={labelled}", "--out-dir", str(out),
                 "--plot"]) == 0  # fmt: skip
    # 1 image of each of the 12 classes; validation on its own data (2 per class leave no room for a held-out share)
    assert main([*base, "--task", "fewshot", "--shots", "1", "--train-data", f"path={labelled}", "--seed", "3",
                 "--val-data", f"path={labelled}", "--out-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "linear_probe of" in printed and "fitted on 24 images" in printed and "fitted on 12 images" in printed
    written = sorted(out.glob("*.json"))
    assert [json.loads(path.read_text())["metrics"]["fewshot_k"] for path in written] == [-1, 1]
    assert written[1].name == written[0].name.replace(".json", "_1shot.json")  # CLIP_benchmark's name, + K shots
    assert sorted(path.suffix for path in out.iterdir() if not path.name.startswith(".")) == [".json", ".json", ".png"]
    assert main([*base, "--task", "fewshot", "--shots", "2", "--train-data", f"path={labelled}"]) == 2
    assert "have fewer than 2 training images" in capsys.readouterr().err


def test_the_index_tie_rule_is_an_option(trained: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "--checkpoint", str(trained["checkpoint"]), "--task", "retrieval", "--data", "kind=manifest",
            f"path={trained['shapes']}"]  # fmt: skip
    results = {}
    for ties in ("pessimistic", "index"):
        assert main([*base, "--ties", ties, "--out", str(tmp_path / f"{ties}.json")]) == 0
        results[ties] = json.loads((tmp_path / f"{ties}.json").read_text())["metrics"]
    # the shapes have distinct captions and images: no tie, so the rules agree
    assert results["pessimistic"] == results["index"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--task", "fewshot"], "--task=fewshot needs --shots K"),
        (["--task", "zeroshot", "--shots", "2"], "--shots applies to the fewshot task only"),
        (["--task", "retrieval", "--templates", "cifar10"], "--templates sets zero-shot prompts"),
        (["--task", "retrieval", "--train-data", "path={labelled}"], "--train-data is the training data of a probe"),
        (["--task", "linear_probe", "--train-data", "split=train"], "--train-data: data.split='train'"),
        (["--task", "linear_probe"], "give --train-data"),
        (["--task", "linear_probe", "--train-data", "path={shapes}"], "--train-data"),  # no labels there
        (["--task", "linear_probe", "--train-data", "path={labelled}", "--val-proportion", "1"], "must lie in (0, 1)"),
    ],
)
def test_probe_and_task_mistakes_exit_2_with_a_message(
    trained: dict[str, Path], capsys: pytest.CaptureFixture, arguments: list[str], message: str
) -> None:
    arguments = [argument.format(**{key: str(value) for key, value in trained.items()}) for argument in arguments]
    command = ["eval", "--checkpoint", str(trained["checkpoint"]), "--data", "kind=manifest",
               f"path={trained['labelled']}", *arguments]  # fmt: skip
    assert main(command) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error


def test_eval_needs_a_task_or_a_suite_and_data_for_a_task(
    trained: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    checkpoint = str(trained["checkpoint"])
    with pytest.raises(SystemExit) as parse_error:  # argparse: one of --task and --suite, not both
        main(["eval", "--checkpoint", checkpoint, "--task", "retrieval", "--suite", "offline"])
    assert parse_error.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", checkpoint, "--task", "retrieval"]) == 2
    assert "--task retrieval needs --data" in capsys.readouterr().err
