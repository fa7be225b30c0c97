"""Training throughput of LiT heads with cached tower features against running both locked towers every step.

Both runs are the default demo recipe's model (``demo-lit``: locked EfficientNet-Lite0 at 224 px + locked
all-MiniLM-L6-v2, linear heads) on the emoji training split, batch 256, without evaluation rounds through ``clipforge.train.loop.train``,
in this one process, one after the other:

* ``cached``: ``data.cache_features=true``; the cache is built first (its time is reported apart), then a
  second run that finds it complete is timed;
* ``live``: ``data.cache_features=false``; the same model runs both towers on every batch.

Samples/s is the trainer's own figure (``samples_per_second`` in its log, every step: ``logging.log_every=1``),
the median over the steps after the first (which holds the loader's start). Without the demo extra
(``pip install 'clipforge[demo]'``) the same architectures are built with random weights, which run at the
same speed; the output says which.

    python benchmarks/lit_speed.py                      # 100 cached steps, 4 live steps
    python benchmarks/lit_speed.py --threads 2 --cached-steps 200 --live-steps 6 --json lit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipforge.config import load_config
from clipforge.model.vision import resolve_image_preprocess
from clipforge.packaged import packaged_available
from clipforge.train.loop import train


def run(output: Path, steps: int, cache: bool, extra: list[str]) -> tuple[float, float, list[float]]:
    """(wall seconds of train(), median samples/s after the first step, every step's samples/s)."""
    overrides = [
        # the emoji training split with its deterministic transform, batch 256, no evaluation rounds: the setting
        # these figures have always described (the demo recipe itself now trains on a mix, see its YAML)
        "data.kind=emoji",
        "data.cached_views=0",
        "data.augment.invert=0",
        "train.batch_size=256",
        "eval.tasks=[]",
        "eval.best_metric=",
        "eval.every=0",
        f"train.output_dir={output}",
        f"train.steps={steps}",
        f"train.checkpoint_every={steps}",
        f"data.cache_features={'true' if cache else 'false'}",
        "logging.log_every=1",
        "logging.progress=false",
        "logging.backends=[]",
        *extra,
    ]
    started = time.perf_counter()
    result = train(load_config("demo-lit", overrides))
    seconds = time.perf_counter() - started
    rates = [record["samples_per_second"] for record in result.history]
    return seconds, statistics.median(rates[1:] or rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cached-steps", type=int, default=100)
    parser.add_argument("--live-steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo-lit recipe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    extra = list(args.overrides)
    pretrained = packaged_available("package:efficientnet-lite0") and packaged_available("package:all-minilm-l6-v2")
    if not pretrained:  # same architectures, random weights: the same work per step
        extra += ["model.image.pretrained=null", "model.text.pretrained=null"]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        build_seconds, _, _ = run(folder / "build", 1, True, [*extra, f"data.feature_cache={folder / 'cache'}"])
        cached_seconds, cached_rate, _ = run(
            folder / "cached", args.cached_steps, True, [*extra, f"data.feature_cache={folder / 'cache'}"]
        )
        live_seconds, live_rate, live_rates = run(folder / "live", args.live_steps, False, extra)
    config = load_config("demo-lit", extra)
    results = {
        "weights": "packaged pretrained" if pretrained else "random (demo extra not installed)",
        "batch_size": config.train.batch_size,
        "image_size": resolve_image_preprocess(config.model.image).image_size,
        "threads": args.threads,
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
        "cache_build_run_seconds": build_seconds,
        "cached_samples_per_second": cached_rate,
        "cached_run_seconds": cached_seconds,
        "live_samples_per_second": live_rate,
        "live_samples_per_second_each_step": live_rates,
        "live_run_seconds": live_seconds,
        "speedup": cached_rate / live_rate,
    }
    print(
        f"LiT heads on locked EfficientNet-Lite0 ({results['image_size']} px) + MiniLM, batch "
        f"{results['batch_size']}, {args.threads} threads, weights: {results['weights']}; "
        f"load average {load:.1f} before, {results['load_average_after']:.1f} after"
    )
    print(f"  cache build (3,002 images + captions) + 1 step: {build_seconds:8.1f} s")
    print(f"  cached features : {cached_rate:10.1f} samples/s  ({args.cached_steps} steps in {cached_seconds:.1f} s)")
    print(f"  live towers     : {live_rate:10.1f} samples/s  ({args.live_steps} steps in {live_seconds:.1f} s)")
    print(f"  speed-up        : {results['speedup']:10.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
