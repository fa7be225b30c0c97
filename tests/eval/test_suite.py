"""``clipforge eval --suite``: three datasets in one command, one table; a finished dataset is not run again."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from clipforge.cli import main
from clipforge.eval.suite import NAMED_SUITES, load_suite


@pytest.fixture(scope="module")
def world(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    checkpoint, images = tiny_checkpoint
    folder = tmp_path_factory.mktemp("suite")
    manifest = images.parent / "train.csv"
    labelled = folder / "colours.csv"  # the shapes labelled by colour: 4 classes
    rows = [row for row in csv.DictReader(manifest.open())]
    with labelled.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        for row in rows[::2]:
            writer.writerow([str(images.parent / row["image"]), row["caption"], row["image"].split("_")[1]])
    suite = folder / "suite.yaml"
    labelled_data = {"kind": "manifest", "path": str(labelled)}
    entries = [
        {"name": "colours", "task": "zeroshot", "data": labelled_data, "templates": "a {} shape"},
        {"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}},
        {
            "name": "colours",
            "task": "fewshot",
            "shots": 2,
            "data": labelled_data,
            "train_data": {"path": str(labelled)},
        },
    ]
    suite.write_text(yaml.safe_dump({"datasets": entries}))
    return {"checkpoint": checkpoint, "suite": suite, "labelled": labelled, "manifest": manifest, "folder": folder}


def run_suite(world: dict[str, Path], out: Path, *more: str) -> int:
    checkpoint, suite = str(world["checkpoint"]), str(world["suite"])
    return main(["eval", "--checkpoint", checkpoint, "--suite", suite, "--out-dir", str(out), *more])


def test_a_suite_of_three_datasets_prints_one_table_and_resumes(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "results"
    assert run_suite(world, out, "--plot") == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("3 datasets") :]
    for expected in ("dataset", "colours", "shapes", "zeroshot_classification", "zeroshot_retrieval", "linear_probe",
                     "acc1", "image_retrieval_recall@5", "lp_acc1"):  # fmt: skip
        assert expected in table, expected
    results = sorted(out.glob("*.json"))
    assert len(results) == 3
    records = [json.loads(path.read_text()) for path in results]
    assert {record["task"] for record in records} == {"zeroshot_classification", "zeroshot_retrieval", "linear_probe"}
    assert {record["pretrained"] for record in records} == {str(world["checkpoint"])}
    fewshot = next(record for record in records if record["task"] == "linear_probe")
    assert fewshot["metrics"]["fewshot_k"] == 2 and 0 <= fewshot["metrics"]["lp_acc1"] <= 1
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [row["dataset"] for row in summary] == ["colours", "shapes", "colours"]  # the suite's order
    assert all(row["model_fullname"] == f"{row['model']} {world['checkpoint']}" for row in summary)
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # again: every dataset is finished, so none runs; the files stay as they were
    before = {path: path.read_bytes() for path in results}
    (results[0]).unlink()  # ... except this one, which runs again
    assert run_suite(world, out) == 0
    printed = capsys.readouterr().out
    assert printed.count("): finished before, read") == 2 and "read from the results folder" in printed
    assert all(path.read_bytes() == data for path, data in before.items() if path != results[0])
    assert json.loads(results[0].read_text())["metrics"] == json.loads(before[results[0]])["metrics"]


def test_suite_mistakes_exit_2_with_the_entry_named(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def refused(suite: dict | str, *more: str, out: Path | None = None) -> str:
        path = tmp_path / "bad.yaml"
        path.write_text(suite if isinstance(suite, str) else yaml.safe_dump(suite))
        argv = ["eval", "--checkpoint", str(world["checkpoint"]), "--suite", str(path), *more]
        argv += ["--out-dir", str(out or tmp_path / "out")]
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert "Traceback" not in error and error.count("\n") == 1
        return error

    data = {"kind": "manifest", "path": str(world["labelled"])}
    assert "datasets[0]: unknown keys ['template']" in refused({"datasets": [{"task": "zeroshot", "data": data,
                                                                             "template": "x"}]})  # fmt: skip
    assert "datasets[0].task=fewshot needs" in refused({"datasets": [{"task": "fewshot", "data": data}]})
    assert "datasets[1]" in refused({"datasets": [{"task": "retrieval", "data": data}] * 2})  # listed twice
    assert "non-empty 'datasets' list" in refused("datasets: []\n")
    assert "datasets[0].data.pth" in refused({"datasets": [{"task": "retrieval", "data": {**data, "pth": "x"}}]})
    assert "remove --data" in refused({"datasets": [{"task": "retrieval", "data": data}]}, "--data", "kind=emoji")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    message = refused({"datasets": [{"task": "retrieval", "data": data}]}, out=foreign)
    assert "holds files that are not evaluation results (notes.txt)" in message
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert main(["eval", "--checkpoint", str(world["checkpoint"]), "--suite", str(world["suite"])]) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_the_shipped_offline_suite_names_files_that_are_there() -> None:
    suite = load_suite("offline")
    assert [task.task for task in suite.tasks] == ["retrieval", "retrieval", "zeroshot", "linear_probe"]
    for task in suite.tasks:
        for data in (task.data, task.train_data):
            if data is not None and data.get("path"):
                assert Path(data.path).is_file(), data.path
    assert set(NAMED_SUITES) == {"offline"}


def test_the_readme_suite_example_is_a_valid_suite() -> None:
    import re

    from clipforge.eval.suite import suite_from_dict

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [body for body in re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M) if "datasets:" in body]
    suite = suite_from_dict(yaml.safe_load(block), "README")
    assert [(task.name, task.task) for task in suite.tasks] == [
        ("stl10", "zeroshot"),
        ("coco", "retrieval"),
        ("stl10", "fewshot"),
    ]
    assert suite.tasks[2].train_data.split == "train" and suite.tasks[2].train_data.name == "STL10"
