"""The benchmark scripts run: vs_open_clip.py builds one model in both frameworks and its smoke mode writes every
result; run_all.py runs each script in its quick mode and rewrites only the README's results block.

Cheap on purpose: the smoke run in this process, one memory subprocess (clipforge only: no open_clip import),
micro models or the meta device elsewhere; the open_clip tests are skipped where open_clip_torch is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_all  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

# the parameter counts of open_clip's own ViT-B-32 and ViT-B-16 (the CLIP paper's models)
EXPECTED_PARAMETERS = {"tiny": 20_752_897, "B-32": 151_277_313, "B-16": 149_620_737}


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_size_has_equal_parameter_counts_in_both_frameworks():
    open_clip = pytest.importorskip("open_clip")
    from _open_clip_sides import SIZES
    from open_clip.model import CLIP

    from clipforge.config import config_from_dict
    from clipforge.model import create_model

    for name, expected in EXPECTED_PARAMETERS.items():
        arch = SIZES[name]
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            theirs = CLIP(**arch.open_clip_config())
            ours = create_model(config_from_dict({"model": arch.clipforge_model()}).model, vocab_size=arch.vocab_size)
        assert _count(theirs) == _count(ours) == expected, name
    with torch.device("meta"):  # and B-32 is open_clip's own ViT-B-32 config
        builtin = CLIP(**open_clip.get_model_config("ViT-B-32"))
    assert _count(builtin) == EXPECTED_PARAMETERS["B-32"]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_both_frameworks_compute_the_same_model_and_loss(loss):
    pytest.importorskip("open_clip")
    from _open_clip_sides import SIZES, build_sides, check_same_function, count_parts, synthetic_inputs

    arch, device = SIZES["smoke"], torch.device("cpu")
    inputs = synthetic_inputs(arch, 6, device)
    # the end-of-text id is the highest id and sits at the last real token: both poolings pick it
    assert torch.equal(inputs.input_ids.argmax(dim=1), inputs.attention_mask.sum(dim=1) - 1)
    sides = build_sides(arch, loss, "fp32", inputs, device)
    counts = count_parts(sides)
    assert counts["clipforge"] == counts["open_clip"]
    assert counts["clipforge"]["logit"] == (2 if loss == "siglip" else 1)
    result = check_same_function(sides, arch, device)
    assert result["shared"], result["note"]
    assert max(result["max_embedding_difference"].values()) < 1e-5
    clipforge_loss, open_clip_loss = (float(side.train_step()) for side in sides)
    assert clipforge_loss == pytest.approx(open_clip_loss, rel=1e-4)


def test_vs_open_clip_smoke_run_writes_every_result(tmp_path, capsys):
    pytest.importorskip("open_clip")
    import vs_open_clip

    output = tmp_path / "results.json"
    # in this process (an interpreter start with torch costs more than the run); the memory subprocess is the
    # next test's
    vs_open_clip.main(["--smoke", "--loss", "siglip", "--precision", "fp32", "--threads", "1", "--no-memory",
                       "--json", str(output)])  # fmt: skip
    data = json.loads(output.read_text())
    (row,) = data["results"]
    assert row["parameters"]["clipforge"] == row["parameters"]["open_clip"]
    assert row["weights"]["shared"]
    assert len(row["train"]["ratios"]) == 1 and row["train"]["median_ratio"] > 0
    assert set(row["inference"]) == {"images", "texts"}
    assert all(row["flops_per_sample"][framework] > 0 for framework in ("clipforge", "open_clip"))
    assert 0 < row["train"]["utilization_vs_measured_matmul"]["clipforge"]
    assert data["environment"]["torch_threads"] == 1
    assert "load_average_after" in data["environment"]
    assert any(line.startswith("smoke  siglip  fp32  train") for line in data["summary"])
    assert "summary (medians over the rounds" in capsys.readouterr().out


def test_vs_open_clip_measures_memory_in_a_fresh_process():
    import argparse

    import vs_open_clip

    options = argparse.Namespace(
        batch=8, threads=1, device="cpu", memory_steps=1, memory_timeout=300.0, glibc_malloc=False
    )
    memory = vs_open_clip.measure_memory(options, "smoke", "clip", "fp32", "clipforge")
    assert "error" not in memory, memory
    assert memory["framework"] == "clipforge" and memory["method"].startswith("peak RSS")
    assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
    assert memory["growth_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"]


def test_vs_open_clip_refuses_to_replace_an_existing_json(tmp_path, capsys):
    import vs_open_clip

    existing = tmp_path / "old.json"
    existing.write_text('{"kept": true}')
    with pytest.raises(SystemExit) as raised:
        vs_open_clip.parse_args(["--smoke", "--json", str(existing)])
    assert raised.value.code == 2
    assert f"--json {existing} already exists; choose another path or pass --force" in capsys.readouterr().err
    assert existing.read_text() == '{"kept": true}'


FAST_SCRIPT = """
import argparse, json
parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true")
parser.add_argument("--json")
args = parser.parse_args()
print("fast ran", "quick" if args.quick else "full")
json.dump({"quick": args.quick}, open(args.json, "w"))
"""
BROKEN_SCRIPT = """
import argparse, sys
parser = argparse.ArgumentParser()
parser.add_argument("--smoke", action="store_true")
parser.parse_args()
sys.exit("boom: nothing to measure")
"""


def test_run_all_runs_each_script_in_its_quick_mode_and_rewrites_only_the_block(tmp_path, capsys):
    (tmp_path / "fast.py").write_text(FAST_SCRIPT)
    (tmp_path / "broken.py").write_text(BROKEN_SCRIPT)
    (tmp_path / "plain.py").write_text("print('no flags at all')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('a helper is never run')\n")
    readme = tmp_path / "README.md"
    before, after = "# Benchmarks\n\nIntro kept.\n\n", "\n\n## Later section\n\nAlso kept.\n"
    readme.write_text(before + run_all.BEGIN + "\nold figures\n" + run_all.END + after)

    for _ in range(2):  # a second run replaces the block, it does not add one
        assert run_all.main(["--quick", "--folder", str(tmp_path)]) == 1  # broken.py failed
    text = readme.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert text.count(run_all.BEGIN) == 1 and "old figures" not in text
    block = text[text.index(run_all.BEGIN) : text.index(run_all.END)]
    assert "**fast.py** (its --quick flag): `python benchmarks/fast.py --quick`: ok" in block
    assert "fast ran quick" in block
    assert "**broken.py** (its --smoke flag)" in block and "FAILED (boom: nothing to measure)" in block
    assert "**plain.py**: skipped: it has no --quick or --smoke flag" in block
    assert "_helper" not in block
    assert "failed: broken.py" in capsys.readouterr().err


def test_run_all_appends_the_block_to_a_readme_without_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nOnly this.\n")
    run_all.write_readme(readme, f"{run_all.BEGIN}\nfigures\n{run_all.END}")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nOnly this.\n")
    assert f"{run_all.SECTION_TITLE}\n\n{run_all.BEGIN}\nfigures\n{run_all.END}\n" in text


def test_run_all_knows_a_quick_mode_for_every_benchmark_script():
    plans = {script.name: run_all.plan_for(script, quick=True) for script in run_all.benchmark_scripts(BENCHMARKS)}
    assert {"vs_open_clip.py", "gpu_throughput.py", "memory.py"} <= set(plans)
    assert not any(name.startswith("_") or name == "run_all.py" for name in plans)
    assert [name for name, plan in plans.items() if plan.arguments is None] == []
    assert plans["vs_open_clip.py"].arguments == ["--quick"]
    assert plans["gpu_throughput.py"].arguments == ["--smoke"]


def test_run_all_reads_the_json_a_script_prints_last():
    stdout = '{"exact": []}\n{\n  "exact": [],\n  "embedding": {"model": "demo", "images_per_s": 12.5}\n}\n'
    assert run_all.figures_of("search_speed.py", None, stdout)[-1] == "embedding: 12.5 images/s (demo)"
    assert run_all.figures_of("search_speed.py", None, "no json here\n")[0].startswith("(its output is not in")


def test_run_all_refuses_an_unknown_script(tmp_path, capsys):
    readme = tmp_path / "README.md"
    with pytest.raises(SystemExit) as raised:
        run_all.main(["--quick", "--only", "nope.py", "--readme", str(readme)])
    assert raised.value.code == 2
    assert "no benchmark script ['nope.py'] in" in capsys.readouterr().err
    assert not readme.exists()
