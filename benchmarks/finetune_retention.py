"""Measured retention: how much zero-shot skill a fine-tune keeps, plain, with EMA, with WiSE-FT and with LoRA.

The start is a model with zero-shot skill: the demo's LiT model (``demo-lit``: EfficientNet-Lite0 + MiniLM, locked,
heads trained on emoji, clip art and flags), trained here in the work folder unless ``--base`` names one. From it:

* ``fine-tune``: the ``finetune-demo`` recipe for ``--steps`` steps: the text tower (and the heads) fine-tuned on
  the clip art's training split, the image tower locked (its features cached);
* ``+ EMA``: the same run's moving average of its weights (``train.ema``; ``--weights ema``), no extra training;
* ``WiSE-FT``: the start and the fine-tune interpolated, ``(1 - alpha) * start + alpha * fine-tune``, at alphas
  chosen on VALIDATION data only (``clipforge.train.wise_ft`` / ``clipforge merge``): ``best`` maximizes the mean
  of the target and the retained score, ``matched`` is the smallest alpha whose target reaches the fine-tune's;
* ``LoRA``: the ``finetune-demo-lora`` recipe (rank-8 adapters on the text tower's attention and MLP layers).

Target: clip art retrieval, the mean of text -> image and image -> text R@5 over every caption of the held-out
drawings. Retained (never trained on by the fine-tune): emoji name -> image R@5, icons R@5 (the mean of both
directions), Fashion-MNIST and MNIST zero-shot top-1; ``retained`` is their mean. Validation: the demo's val sources
(``clipforge.demo.demo_sources('val')``: emoji and clip art val, icons train + val, Fashion-MNIST *train* images,
MNIST digits 0-99 of each class); test: its test sources (emoji and clip art test, icons test, Fashion-MNIST t10k,
MNIST digits 400-499), read once, after every choice is made.

    python benchmarks/finetune_retention.py --work /tmp/retention                  # ~20 min on 2 cores
    python benchmarks/finetune_retention.py --work /tmp/retention --base demo-output/run/best.pt --steps 150
    python benchmarks/finetune_retention.py --work /tmp/r --quick                   # a smoke run: not a measurement
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_model

from clipforge.config import load_config
from clipforge.demo import demo_sources, evaluate_demo
from clipforge.eval.features import LockedTowerMemo
from clipforge.interop.load import build, resolve
from clipforge.interop.merge import interpolate
from clipforge.train.loop import train

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


def run_recipe(recipe: str, base: Path, folder: Path, steps: int, cache: Path, extra: list[str]) -> Path:
    """Train ``recipe`` from ``base`` for ``steps`` steps into ``folder``; its last checkpoint."""
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
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (runs, feature cache)")
    parser.add_argument("--base", type=Path, default=None, help="the start (default: train demo-lit in --work)")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps of each run")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a few steps everywhere: checks the script runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    work, cache = args.work, args.work / "feature_cache"
    steps = 4 if args.quick else args.steps
    base = args.base or train_base(work, cache, args.quick)
    timings = {"base": time.perf_counter() - started}
    quick = ["train.batch_size=64"] if args.quick else []

    began = time.perf_counter()
    full = run_recipe("finetune-demo", base, work / "full", steps, cache, quick)
    timings["fine-tune"] = time.perf_counter() - began
    began = time.perf_counter()
    lora = run_recipe("finetune-demo-lora", base, work / "lora", steps, cache, quick)
    timings["lora"] = time.perf_counter() - began

    start_weights, full_weights = resolve(str(base)), resolve(str(full))
    models = {
        "start (demo LiT)": lambda: build(start_weights),
        "fine-tune": lambda: build(full_weights),
        "+ EMA": lambda: build(resolve(str(full), "ema")),
        "LoRA (r=8)": lambda: build(resolve(str(lora))),
    }
    # choices on validation only
    began = time.perf_counter()
    validation = Evaluator("val")
    val = {name: validation(make()) for name, make in models.items()}
    curve = {alpha: validation(build(interpolate(start_weights, full_weights, alpha))) for alpha in ALPHAS}
    chosen = choose_alphas(curve, val["fine-tune"])
    timings["validation"] = time.perf_counter() - began
    # test: read once, for the chosen models
    began = time.perf_counter()
    for rule, alpha in chosen.items():
        models[f"WiSE-FT alpha={alpha:g} ({rule} on val)"] = lambda a=alpha: build(
            interpolate(start_weights, full_weights, a)
        )
    test_evaluator = Evaluator("test")
    test = {name: test_evaluator(make()) for name, make in models.items()}
    timings["test"] = time.perf_counter() - began
    timings["total"] = time.perf_counter() - started

    print(f"finetune_retention: {steps} steps, CPU {cpu_model()} ({os.cpu_count()} cores), "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("\nvalidation: the WiSE-FT curve (alpha, target, retained mean)")
    for alpha, s in curve.items():
        print(f"  {alpha:4.1f}  {s.target:.3f}  {s.retained_mean:.3f}")
    print(f"chosen on validation: {chosen}\n\ntest\n{table(test, test['start (demo LiT)'])}")
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if args.json:
        record = {
            "steps": steps,
            "cpu": cpu_model(),
            "chosen": chosen,
            "validation": {name: vars(s) for name, s in val.items()},
            "curve": {str(alpha): vars(s) for alpha, s in curve.items()},
            "test": {name: vars(s) for name, s in test.items()},
            "seconds": timings,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
