"""Measured retention: how much zero-shot skill a fine-tune keeps, plain, with EMA, with WiSE-FT and with LoRA.

The start is a model with zero-shot skill: the demo's LiT model (``demo-lit``: EfficientNet-Lite0 + MiniLM, locked,
heads trained on emoji, clip art and flags), trained here in the work folder unless ``--base`` names one. From it:

* ``fine-tune (recipe)``: the ``finetune-demo`` recipe for ``--steps`` steps: the text tower (and the heads)
  fine-tuned on the clip art's training split, the image tower locked (its features cached);
* ``aggressive fine-tune``: the same with the settings the recipe guards against (:data:`AGGRESSIVE`: 10x the
  learning rate, the tower at the heads' rate, no layer decay, no warmup): what forgetting looks like;
* ``+ EMA``: each run's moving average of its weights (``train.ema``; ``--weights ema``), no extra training;
* ``WiSE-FT``: the start and each fine-tune interpolated, ``(1 - alpha) * start + alpha * fine-tune``, at alphas
  chosen on VALIDATION data only (``clipforge.train.wise_ft`` / ``clipforge merge``): ``best`` maximizes the mean
  of the target and the retained score, ``matched`` is the smallest alpha whose target reaches the fine-tune's;
* ``LoRA``: the ``finetune-demo-lora`` recipe (rank-8 adapters on the text tower's attention and MLP layers).

Target: clip art retrieval, the mean of text -> image and image -> text R@5 over every caption of the held-out
drawings. Retained (never trained on by the fine-tune): emoji name -> image R@5, icons R@5 (the mean of both
directions), Fashion-MNIST and MNIST zero-shot top-1; ``retained`` is their mean. Validation: the demo's val sources
(``clipforge.demo.demo_sources('val')``: emoji and clip art val, icons train + val, Fashion-MNIST *train* images,
MNIST digits 0-99 of each class); test: its test sources (emoji and clip art test, icons test, Fashion-MNIST t10k,
MNIST digits 400-499), read once, after every choice is made.

    python benchmarks/finetune_retention.py --work /tmp/retention                  # ~30 min on 2 cores
    python benchmarks/finetune_retention.py --work /tmp/retention --base demo-output/run/best.pt --steps 150
    python benchmarks/finetune_retention.py --work /tmp/r --quick                   # a smoke run: not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_model

from clipforge.checkpoint import read_checkpoint
from clipforge.config import load_config
from clipforge.demo import demo_sources, evaluate_demo
from clipforge.eval.features import LockedTowerMemo
from clipforge.interop.load import build, resolve
from clipforge.interop.merge import interpolate
from clipforge.train.loop import train

# the settings the recipe guards against (README "Fine-tuning"): 10x its learning rate, the pretrained tower at
# the heads' rate, no layer decay, no warmup
AGGRESSIVE = ["optim.lr=1.0e-3", "model.text.lr_scale=1.0", "model.text.layer_decay=1.0", "schedule.warmup_steps=0"]
ALPHAS = [round(0.1 * step, 1) for step in range(11)]
RETAINED = ("emoji", "icons", "fashion_mnist", "mnist")
FASHION_PER_CLASS = 100  # 1,000 balanced Fashion-MNIST images per split (the demo reports 2,000)


@dataclass
class Scores:
    """One model's figures on one split: the target, each retained figure and their mean."""

    target: float
    retained: dict[str, float]

    @property
    def retained_mean(self) -> float:
        return sum(self.retained.values()) / len(self.retained)

    @property
    def balance(self) -> float:
        """What ``best`` maximizes: the mean of the target and the retained mean."""
        return (self.target + self.retained_mean) / 2


def scores(metrics: dict[str, float]) -> Scores:
    """The benchmark's figures from :func:`clipforge.demo.evaluate_demo`'s metrics."""
    retained = {
        "emoji": metrics["text_to_image_R@5"],
        "icons": (metrics["icons_t2i_R@5"] + metrics["icons_i2t_R@5"]) / 2,
        "fashion_mnist": metrics["fashion_mnist_zeroshot_top1"],
        "mnist": metrics["mnist_zeroshot_top1"],
    }
    return Scores((metrics["clipart_t2i_R@5"] + metrics["clipart_i2t_R@5"]) / 2, retained)


class Evaluator:
    """The demo's evaluation on one split's sources (clip art and icons of the corpus), with the locked image
    tower's features computed once for every model (every model here shares that tower, bit for bit)."""

    def __init__(self, split: str) -> None:
        self.sources = demo_sources(split, per_class=FASHION_PER_CLASS)
        self.sources.corpus = {name: self.sources.corpus[name] for name in ("clipart", "icons")}
        self.memo = LockedTowerMemo()

    def __call__(self, loaded) -> Scores:
        self.memo.texts.clear()  # text towers differ between models: only the image features are shared
        metrics, _, _, _ = evaluate_demo(loaded, self.sources, self.memo)
        return scores(metrics)


def run_recipe(recipe: str, base: Path, folder: Path, steps: int, cache: Path, extra: list[str], reuse: bool) -> Path:
    """Train ``recipe`` from ``base`` for ``steps`` steps into ``folder``; its last checkpoint (with ``reuse``, the
    one a previous run of this script left there, if its step is ``steps``)."""
    if reuse and (folder / "last.pt").is_file() and read_checkpoint(folder / "last.pt").step == steps:
        print(f"reusing {folder / 'last.pt'}", flush=True)
        return folder / "last.pt"
    overrides = [
        f"model.init={base}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        f"train.output_dir={folder}",
        f"data.feature_cache={cache}",
        "eval.every=0",
        "eval.tasks=[]",
        "eval.best_metric=''",
        "logging.progress=false",
        "logging.backends=[]",
        *extra,
    ]
    return train(load_config(recipe, overrides), overwrite=True).checkpoint


def train_base(work: Path, cache: Path, quick: bool) -> Path:
    """The demo's LiT model (``demo-lit``), trained into ``work/base``; its best.pt (chosen on icons train)."""
    overrides = [f"train.output_dir={work / 'base'}", f"data.feature_cache={cache}", "logging.progress=false"]
    if quick:
        overrides += ["train.steps=20", "train.batch_size=256", "eval.every=10", "train.checkpoint_every=20"]
    result = train(load_config("demo-lit", overrides), overwrite=True)
    best = result.output_dir / "best.pt"
    return best if best.is_file() else result.checkpoint


def choose_alphas(curve: dict[float, Scores], fine_tune: Scores) -> dict[str, float]:
    """``best``: the alpha with the highest mean of target and retained; ``matched``: the smallest alpha whose target
    reaches the fine-tune's (both on validation)."""
    best = max(curve, key=lambda alpha: (curve[alpha].balance, -alpha))
    matched = min((alpha for alpha, s in curve.items() if s.target >= fine_tune.target), default=1.0)
    return {"best": best, "matched": matched}


def table(rows: dict[str, Scores], start: Scores) -> str:
    """The Markdown table of benchmarks/README.md: each figure, and the retained mean's change from the start."""
    header = (
        "| model | clip art R@5 (target) | emoji R@5 | icons R@5 | Fashion-MNIST | MNIST | retained mean | vs start |"
    )
    lines = [header, "|" + " --- |" * 8]
    for name, s in rows.items():
        figures = " | ".join(f"{s.retained[key]:.3f}" for key in RETAINED)
        change = s.retained_mean - start.retained_mean
        lines.append(
            f"| {name} | {s.target:.3f} ({s.target - start.target:+.3f}) | {figures} | {s.retained_mean:.3f} | "
            f"{change:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (runs, feature cache); default: a new temporary one"
    )
    parser.add_argument("--base", type=Path, default=None, help="the start (default: train demo-lit in --work)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of each run (the recipes' 150)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--reuse", action="store_true", help="reuse the fine-tunes a previous run left in --work")
    parser.add_argument("--quick", action="store_true", help="a few steps everywhere: checks the script runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="finetune_retention-"))
    cache = work / "feature_cache"
    steps = 4 if args.quick else args.steps
    base = args.base or train_base(work, cache, args.quick)
    timings = {"base": time.perf_counter() - started}
    quick = ["train.batch_size=64"] if args.quick else []

    runs = {}
    for name, recipe, extra in (
        ("fine-tune", "finetune-demo", []),
        ("aggressive", "finetune-demo", AGGRESSIVE),
        ("lora", "finetune-demo-lora", []),
    ):
        began = time.perf_counter()
        runs[name] = run_recipe(recipe, base, work / name, steps, cache, quick + extra, args.reuse)
        timings[name] = time.perf_counter() - began

    start_weights = resolve(str(base))
    models = {"start (demo LiT)": lambda: build(start_weights)}
    for name, label in (("fine-tune", "fine-tune (recipe)"), ("aggressive", "aggressive fine-tune")):
        models[label] = lambda path=runs[name]: build(resolve(str(path)))
        models[f"{label} + EMA"] = lambda path=runs[name]: build(resolve(str(path), "ema"))
    models["LoRA (r=8)"] = lambda: build(resolve(str(runs["lora"])))
    # choices on validation only: a WiSE-FT curve per fine-tune
    began = time.perf_counter()
    validation = Evaluator("val")
    val = {name: validation(make()) for name, make in models.items()}
    curves, chosen = {}, {}
    for name, label in (("fine-tune", "fine-tune (recipe)"), ("aggressive", "aggressive fine-tune")):
        tuned = resolve(str(runs[name]))
        curves[name] = {alpha: validation(build(interpolate(start_weights, tuned, alpha))) for alpha in ALPHAS}
        chosen[name] = choose_alphas(curves[name], val[label])
    timings["validation"] = time.perf_counter() - began
    # test: read once, for the chosen models
    began = time.perf_counter()
    for name, rules in chosen.items():
        for rule, alpha in rules.items():
            models[f"WiSE-FT of {name}, alpha={alpha:g} ({rule} on val)"] = lambda a=alpha, n=name: build(
                interpolate(start_weights, resolve(str(runs[n])), a)
            )
    test_evaluator = Evaluator("test")
    test = {name: test_evaluator(make()) for name, make in models.items()}
    timings["test"] = time.perf_counter() - began
    timings["total"] = time.perf_counter() - started

    print(f"finetune_retention: {steps} steps, CPU {cpu_model()} ({os.cpu_count()} cores), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, curve in curves.items():
        print(f"\nvalidation: the WiSE-FT curve of {name} (alpha, target, retained mean)")
        for alpha, point in curve.items():
            print(f"  {alpha:4.1f}  {point.target:.3f}  {point.retained_mean:.3f}")
    print(f"chosen on validation: {chosen}\n\ntest\n{table(test, test['start (demo LiT)'])}")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        record = {
            "steps": steps,
            "cpu": cpu_model(),
            "chosen": chosen,
            "validation": {name: vars(s) for name, s in val.items()},
            "curves": {name: {str(a): vars(p) for a, p in curve.items()} for name, curve in curves.items()},
            "test": {name: vars(s) for name, s in test.items()},
            "seconds": timings,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
