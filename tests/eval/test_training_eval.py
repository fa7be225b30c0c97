"""Evaluation during training: the eval config, its records, best.pt, the classifier cache, exact resume."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from clipforge.checkpoint import read_checkpoint
from clipforge.config import EVAL_METRICS, ConfigError, config_from_dict, load_config, save_config
from clipforge.data.manifest import ManifestSource
from clipforge.data.tokenize import build_tokenizer
from clipforge.eval.runner import evaluate_retrieval
from clipforge.interop.load import load_checkpoint
from clipforge.model.factory import build_model, make_processor
from clipforge.train.evaluation import TrainingEvaluator
from clipforge.train.loop import train
from clipforge.train.run_log import read_metrics
from tests.conftest import tiny_config
from tests.eval.handmade import colour_config, colour_model, colour_processor, write_colour_set


def eval_section(shapes: Path, colours: Path, **settings) -> dict:
    return {
        "tasks": [
            {"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(shapes)}},
            {"name": "colours", "task": "zeroshot", "data": {"kind": "manifest", "path": str(colours)}},
        ],
        **settings,
    }


# ----------------------------------------------------------------------------------------------
# The config section
# ----------------------------------------------------------------------------------------------
def test_eval_section_loads_and_round_trips(tmp_path: Path) -> None:
    section = eval_section(tmp_path / "s.csv", tmp_path / "c.csv", every=50, best_metric="colours/acc1")
    section["tasks"][1]["templates"] = ["a {} thing", "the colour {}"]
    config = config_from_dict({"eval": section})
    assert config.eval.tasks[1].templates == ["a {} thing", "the colour {}"]
    assert config.eval.tasks[0].templates == "simple" and config.eval.best_mode == "max"
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"best_metric": "val/acc1"}, "names the task 'val', but eval.tasks has \\['shapes', 'colours'\\]"),
        ({"best_metric": "colours/recall@5"}, "a zeroshot task reports"),
        ({"best_metric": "acc1"}, "must look like '<task name>/<metric>'"),
        ({"best_metric": "shapes/image_retrieval_mean_rank"}, "best_mode=min"),
        ({"best_mode": "lowest"}, "\\['max', 'min'\\]"),
        ({"every": -1}, "eval.every=-1"),
        ({"evry": 5}, "did you mean 'eval.every'"),
    ],
)
def test_eval_section_mistakes_fail_at_load(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"eval": eval_section(tmp_path / "s.csv", tmp_path / "c.csv", **settings)})


def test_eval_task_mistakes_fail_at_load(tmp_path: Path) -> None:
    def task(**fields) -> dict:
        return {"eval": {"tasks": [{"name": "t", "data": {"kind": "emoji"}, **fields}]}}

    with pytest.raises(ConfigError, match="eval.tasks\\[0\\].data.kind='manifest' needs eval.tasks\\[0\\].data.path"):
        config_from_dict(task(data={"kind": "manifest"}))
    with pytest.raises(ConfigError, match="without '/'"):
        config_from_dict(task(name="a/b"))
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict({"eval": {"tasks": [{"name": "t"}, {"name": "t"}]}})
    with pytest.raises(ConfigError, match="only used by zero-shot"):
        config_from_dict(task(task="retrieval", classnames="names.txt"))
    with pytest.raises(ConfigError, match="\\['zeroshot', 'retrieval'\\]"):
        config_from_dict(task(task="linear_probe"))
    with pytest.raises(ConfigError, match="unknown config key 'eval.tasks\\[0\\].template'"):
        config_from_dict(task(template="simple"))
    with pytest.raises(ConfigError, match="eval.tasks is empty"):
        config_from_dict({"eval": {"every": 10}})


def test_metric_names_in_config_match_what_the_runner_reports() -> None:
    # the runner's outputs are checked against EVAL_METRICS in test_runner; here the names themselves
    assert EVAL_METRICS["zeroshot"] == ("acc1", "acc5", "mean_per_class_recall")
    assert "image_retrieval_recall@5" in EVAL_METRICS["retrieval"]


# ----------------------------------------------------------------------------------------------
# The evaluator on a hand-made model
# ----------------------------------------------------------------------------------------------
def test_two_zeroshot_tasks_over_the_same_classes_encode_the_prompts_once(tmp_path: Path) -> None:
    colours = write_colour_set(tmp_path)
    data = {"kind": "manifest", "path": str(colours)}
    config = colour_config(
        eval={
            "tasks": [{"name": "a", "data": data}, {"name": "b", "data": data}],
            "best_metric": "b/acc1",
            "batch_size": 4,
        }
    )
    evaluator = TrainingEvaluator(config, colour_processor(config), contextlib.nullcontext())
    model = colour_model().train()
    record, improved = evaluator.run(model, step=1)
    assert record == {f"{name}/{key}": 1.0 for name in "ab" for key in ("acc1", "acc5", "mean_per_class_recall")}
    assert improved and evaluator.cache.builds == 1 and model.training
    _, improved = evaluator.run(model, step=2)
    assert not improved, "equal is not better"
    assert evaluator.cache.builds == 2, "a new step has new text-tower weights: the prompts are encoded again"


def test_training_refuses_an_eval_it_cannot_run_before_the_first_step(shapes_manifest: Path, tmp_path: Path) -> None:
    config = tiny_config(
        shapes_manifest,
        tmp_path / "run",
        eval={
            "tasks": [{"name": "val", "task": "zeroshot", "data": {"kind": "manifest", "path": str(shapes_manifest)}}]
        },
    )
    with pytest.raises(ConfigError, match="eval.tasks\\[0\\] \\(val\\): .*needs class labels"):
        train(config)
    assert not (tmp_path / "run" / "last.pt").exists()
    three_classes = write_colour_set(tmp_path / "colours", labels={"yellow": "red", "cyan": "blue", "magenta": "red"})
    too_few = tiny_config(
        shapes_manifest,
        tmp_path / "run",
        eval={
            "tasks": [{"name": "val", "data": {"kind": "manifest", "path": str(three_classes)}}],
            "best_metric": "val/acc5",
        },
    )
    with pytest.raises(ConfigError, match="top-5 accuracy needs at least 5"):
        train(too_few)


# ----------------------------------------------------------------------------------------------
# During a real run
# ----------------------------------------------------------------------------------------------
def test_training_eval_logs_metrics_and_keeps_the_best_checkpoint(shapes_manifest: Path, tmp_path: Path) -> None:
    colours = write_colour_set(tmp_path / "colours", per_class=1)
    section = eval_section(shapes_manifest, colours, every=2, best_metric="shapes/image_retrieval_recall@5")
    # steps 2 and 3 (the end, not a multiple of 2)
    config = tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 3, "batch_size": 8}, eval=section)
    result = train(config)
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "shapes/image_retrieval_recall@5" in r]
    assert [r["step"] for r in records] == [2, 3]
    for record in records:
        assert {f"colours/{key}" for key in EVAL_METRICS["zeroshot"]} <= set(record)
        assert {f"shapes/{key}" for key in EVAL_METRICS["retrieval"]} <= set(record)
        assert "loss" not in record
    values = [r["shapes/image_retrieval_recall@5"] for r in records]
    best_step = records[values.index(max(values))]["step"]  # the first of equal values: later ties do not improve
    best = read_checkpoint(result.output_dir / "best.pt")
    assert best.step == best_step
    assert best.training.eval == {
        "best_metric": config.eval.best_metric,
        "best_value": max(values),
        "best_step": best_step,
    }
    assert load_checkpoint(result.output_dir / "best.pt").step == best_step  # a checkpoint like any other
    assert read_checkpoint(result.checkpoint).training.eval["best_value"] == max(values)


def test_eval_changes_nothing_in_training_and_resume_stays_exact(shapes_manifest: Path, tmp_path: Path) -> None:
    colours = write_colour_set(tmp_path / "colours", per_class=1)
    common = {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "keep_checkpoints": 2}
    section = eval_section(shapes_manifest, colours, every=2, best_metric="colours/acc1")
    del section["tasks"][0]  # the zero-shot task alone: evaluation's DataLoader is what could shift the RNG
    plain = train(tiny_config(shapes_manifest, tmp_path / "plain", train=common))
    full = train(tiny_config(shapes_manifest, tmp_path / "run", train=common, eval=section))
    plain_weights = read_checkpoint(plain.checkpoint).weights
    full_weights = read_checkpoint(full.checkpoint).weights
    for key, value in plain_weights.items():
        assert torch.equal(value, full_weights[key]), f"evaluation changed training: {key}"

    uninterrupted = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "colours/acc1" in r]
    best_before = read_checkpoint(tmp_path / "run" / "best.pt")
    resumed = train(
        tiny_config(shapes_manifest, tmp_path / "run", train=common, eval=section),
        resume=tmp_path / "run" / "step_2.pt",  # holds the best of step 2: the continuation compares with it
    )
    resumed_weights = read_checkpoint(resumed.checkpoint).weights
    for key, value in full_weights.items():
        assert torch.allclose(value, resumed_weights[key], atol=1e-6), key
    again = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "colours/acc1" in r]
    assert [r["step"] for r in again] == [r["step"] for r in uninterrupted] == [2, 4]
    for before, after in zip(uninterrupted, again, strict=True):
        assert after == pytest.approx(before, abs=1e-6)
    assert read_checkpoint(tmp_path / "run" / "best.pt").step == best_before.step


def test_locked_towers_run_once_across_rounds_and_give_the_full_pass_figures(
    shapes_manifest: Path, tmp_path: Path
) -> None:
    # LiT: both towers locked, only the heads train. Each round must report what a fresh full pass reports,
    # while the towers run over each source only in the first round.
    section = {
        "tasks": [{"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(shapes_manifest)}}]
    }
    config = tiny_config(shapes_manifest, tmp_path / "run", eval=section)
    config.model.image.lock = True
    config.model.text.lock = True
    source = ManifestSource(shapes_manifest)
    captions = [c for i in range(len(source)) for c in source.captions(i)]
    tokenizer = build_tokenizer(config.model.text.tokenizer, "", captions)
    torch.manual_seed(0)
    model = build_model(config, tokenizer)
    processor = make_processor(config.model, tokenizer)
    evaluator = TrainingEvaluator(config, processor, contextlib.nullcontext())
    source = evaluator.tasks[0].source
    for step in (1, 2):
        record, _ = evaluator.run(model, step)
        model.eval()
        fresh = evaluate_retrieval(model, processor, source, batch_size=256)
        assert {f"shapes/{k}": v for k, v in fresh.metrics.items()} == pytest.approx(record, abs=1e-6)
        with torch.no_grad():  # a training step changes the heads, never the locked towers
            for parameter in model.image_head.parameters():
                parameter.add_(0.5 * torch.randn_like(parameter))
    assert evaluator.memo.image_passes == 1
    assert len(evaluator.memo.texts) == len(set(captions))


def test_an_eval_task_on_shards_measures_what_the_same_images_give_from_a_manifest(tmp_path: Path) -> None:
    """Shards stream in training; an eval task indexes them (one header scan) and reads every sample once."""
    from clipforge.config import DataConfig
    from clipforge.data.pack import pack_source

    manifest = write_colour_set(tmp_path / "colours", per_class=2)
    pack_source(DataConfig(kind="manifest", path=str(manifest)), tmp_path / "shards", shard_size=5)
    spec = str(tmp_path / "shards")  # a folder of shards
    config = colour_config(
        eval={
            "tasks": [
                {"name": "csv", "task": "zeroshot", "data": {"kind": "manifest", "path": str(manifest)}},
                {"name": "tar", "task": "zeroshot", "data": {"kind": "webdataset", "path": spec}},
                {"name": "tar-r", "task": "retrieval", "data": {"kind": "webdataset", "path": spec}},
            ],
            "batch_size": 4,
        }
    )
    evaluator = TrainingEvaluator(config, colour_processor(config), contextlib.nullcontext())
    record, _ = evaluator.run(colour_model(), step=1)
    assert record["tar/acc1"] == record["csv/acc1"] == 1.0 and record["tar-r/image_retrieval_recall@1"] < 1
    assert len(evaluator.tasks[1].source) == 12
