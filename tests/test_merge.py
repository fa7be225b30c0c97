"""``clipforge merge`` (WiSE-FT): alpha 0 and 1 give the two checkpoints' weights exactly, alpha in between their
interpolation; a sweep evaluates every point on eval tasks, and its ends measure what the two checkpoints measure;
models of different architectures or tokenizers are refused with one message, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from clipforge.checkpoint import read_checkpoint
from clipforge.cli import main
from clipforge.config import LoraConfig, config_from_dict, config_to_dict
from clipforge.interop.load import from_pretrained
from clipforge.interop.merge import parse_alphas
from clipforge.train.loop import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def two_ends(tiny_checkpoint: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(A, B, the shapes manifest): the tiny checkpoint, and a run fine-tuned from it for 6 steps with an EMA."""
    start, images = tiny_checkpoint
    manifest = images.parent / "train.csv"
    folder = tmp_path_factory.mktemp("merge")
    train_section = {"steps": 6, "checkpoint_every": 6, "ema": {"decay": 0.5}}
    config = tiny_config(manifest, folder / "run", model={"init": str(start)}, train=train_section)
    fine_tuned = train(config).checkpoint
    return start, fine_tuned, manifest


def merge(*arguments: str) -> int:
    return main(["merge", *arguments])


def test_alpha_zero_and_one_are_the_ends_and_between_is_their_interpolation(two_ends, tmp_path: Path, capsys) -> None:
    start, fine_tuned, _ = two_ends
    first, second = read_checkpoint(start).weights, read_checkpoint(fine_tuned).weights
    assert any(not torch.equal(first[key], second[key]) for key in second)
    merged = {}
    for alpha in ("0", "1", "0.25"):
        out = tmp_path / f"alpha-{alpha}.pt"
        assert merge("--from", str(start), "--to", str(fine_tuned), "--alpha", alpha, "--out", str(out)) == 0
        merged[alpha] = read_checkpoint(out)
    for key in second:
        assert torch.equal(merged["0"].weights[key], first[key]), key
        assert torch.equal(merged["1"].weights[key], second[key]), key
        if second[key].is_floating_point():
            torch.testing.assert_close(merged["0.25"].weights[key], 0.75 * first[key] + 0.25 * second[key])
    assert "merge: (1 - 0.25)" in merged["0.25"].imported_from and merged["0.25"].training is None
    # the merged file is an ordinary checkpoint every command loads; alpha 0 computes what A computes
    loaded, original = from_pretrained(tmp_path / "alpha-0.pt"), from_pretrained(start)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), original.model.encode_image(images))
    assert "wrote" in capsys.readouterr().out


def test_the_fine_tunes_moving_average_merges_too(two_ends, tmp_path: Path) -> None:
    start, fine_tuned, _ = two_ends
    out = tmp_path / "ema.pt"
    assert (
        merge("--from", str(start), "--to", str(fine_tuned), "--to-weights", "ema", "--alpha", "1", "--out", str(out))
        == 0
    )
    average = read_checkpoint(fine_tuned).weights_for("ema")
    for key, value in read_checkpoint(out).weights.items():
        assert torch.equal(value, average[key]), key


def test_a_lora_fine_tune_merges_with_the_model_it_adapted(two_ends, tmp_path: Path) -> None:
    start, _, manifest = two_ends
    config = tiny_config(manifest, tmp_path / "lora", model={"init": str(start)}, train={"steps": 3})
    config.model.text.lora = LoraConfig(rank=2)
    adapted = train(config_from_dict(config_to_dict(config))).checkpoint
    out = tmp_path / "half.pt"
    assert merge("--from", str(start), "--to", str(adapted), "--alpha", "0.5", "--out", str(out)) == 0
    merged = read_checkpoint(out)
    assert not merged.config.model.text.lora.enabled and merged.weights.keys() == read_checkpoint(start).weights.keys()


def test_a_sweep_evaluates_every_point_and_its_ends_are_the_two_models(two_ends, tmp_path: Path, capsys) -> None:
    start, fine_tuned, manifest = two_ends
    tasks = [
        {"name": "shapes", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}},
        {"name": "again", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}},
    ]
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(yaml.safe_dump({"eval": {"tasks": tasks}}))
    results, plot = tmp_path / "sweep.json", tmp_path / "curve.png"
    code = merge(
        "--from", str(start), "--to", str(fine_tuned), "--alpha", "0:1:0.5", "--eval", str(eval_file),
        "--target", "shapes/image_retrieval_recall@1", "--retained", "again/text_retrieval_recall@1",
        "--results", str(results), "--plot", str(plot),
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "shapes/image_retrieval_recall@1" in printed and printed.count("\n  0.50  ") == 1
    sweep = json.loads(results.read_text())
    assert [point["alpha"] for point in sweep["points"]] == [0.0, 0.5, 1.0]
    assert plot.stat().st_size > 1000
    # the ends measure what `clipforge eval` measures on each checkpoint
    for point, checkpoint in ((sweep["points"][0], start), (sweep["points"][-1], fine_tuned)):
        out = tmp_path / f"{checkpoint.stem}-{point['alpha']}.json"
        data = ["--data", "kind=manifest", f"path={manifest}"]
        assert main(["eval", "--checkpoint", str(checkpoint), "--task", "retrieval", *data, "--out", str(out)]) == 0
        expected = json.loads(out.read_text())["metrics"]
        for metric in ("image_retrieval_recall@1", "text_retrieval_recall@5"):
            assert point["metrics"][f"shapes/{metric}"] == pytest.approx(expected[metric]), metric


def test_a_sweep_defaults_to_the_runs_own_eval_section(two_ends, tmp_path: Path, capsys) -> None:
    start, _, manifest = two_ends
    evaluation = {
        "best_metric": "own/image_retrieval_recall@5",
        "tasks": [
            {"name": "own", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}},
            {"name": "other", "task": "retrieval", "data": {"kind": "manifest", "path": str(manifest)}},
        ],
    }
    run = train(
        tiny_config(manifest, tmp_path / "run", model={"init": str(start)}, train={"steps": 2}, eval=evaluation)
    )
    capsys.readouterr()
    assert merge("--from", str(start), "--to", str(run.checkpoint), "--alpha", "0:1:1") == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert "own/image_retrieval_recall@5" in header and "other/image_retrieval_recall@5" in header


def test_models_of_another_architecture_or_tokenizer_are_refused(two_ends, tmp_path: Path, capsys) -> None:
    start, _, manifest = two_ends
    wider = train(tiny_config(manifest, tmp_path / "wide", model={"embed_dim": 16}, train={"steps": 1}))
    retokenized = train(
        tiny_config(manifest, tmp_path / "bpe", data={"caption_templates": ["the {}"]}, train={"steps": 1})
    )
    for other, expected in ((wider.checkpoint, "model.embed_dim: 32 vs 16"), (retokenized.checkpoint, "tokenizers")):
        out = tmp_path / "merged.pt"
        capsys.readouterr()
        assert merge("--from", str(start), "--to", str(other), "--alpha", "0.5", "--out", str(out)) == 2
        error = capsys.readouterr().err
        assert "are not weights of one architecture" in error and expected in error, error
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
        assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--alpha", "0.5"], "give --out C.pt"),
        (["--alpha", "0:1:0.5", "--out", "x.pt"], "--out writes one checkpoint"),
        (["--alpha", "1.5", "--out", "x.pt"], "1.5 lies outside [0, 1]"),
        (["--alpha", "a:b", "--out", "x.pt"], "give a number (0.5) or START:STOP:STEP"),
        (["--alpha", "0.5", "--out", "x.pt", "--plot", "c.png"], "belong to a sweep"),
    ],
)
def test_bad_alphas_and_outputs_are_one_clear_error(two_ends, tmp_path: Path, capsys, arguments, message) -> None:
    start, fine_tuned, _ = two_ends
    arguments = [str(tmp_path / a) if a.endswith((".pt", ".png")) else a for a in arguments]
    assert merge("--from", str(start), "--to", str(fine_tuned), *arguments) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(0, 10),
    length=st.integers(0, 10),
    step=st.sampled_from([0.05, 0.1, 0.125, 0.2, 0.25, 0.5]),
)
def test_a_sweep_spec_gives_evenly_spaced_alphas_ending_at_stop(start: int, length: int, step: float) -> None:
    low, high = start / 20, min(1.0, start / 20 + length * step)
    alphas = parse_alphas(f"{low}:{high}:{step}")
    assert alphas[0] == low and all(0 <= a <= 1 for a in alphas)
    assert all(abs(b - a - step) < 1e-9 for a, b in zip(alphas, alphas[1:], strict=False))
    assert high - alphas[-1] < step - 1e-9 or abs(high - alphas[-1]) < 1e-9
