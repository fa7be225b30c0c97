"""Throughput of the demo's feature-cache work on a machine that another process keeps busy.

The workload is what the cold ``clipforge demo`` spends most of its time on: the demo's image tower
(EfficientNet-Lite0 at 224 px; random weights where the demo extra is missing: the same speed) embedding images
through ``clipforge.eval.features.encode_source_images`` (the one path the feature-cache builder, ``embed`` and
evaluation use), torch at every core this process may use. Each measurement runs in a fresh subprocess, because
OpenMP reads its wait settings when torch loads:

* ``openmp default``: OpenMP's own waiting (libgomp spins ~300,000 times at a barrier before it sleeps);
* ``clipforge``: what the ``clipforge`` command sets before torch loads (``clipforge.cores.quiet_openmp_waits``:
  threads sleep at once when other processes keep this process's cores busy as it starts, else a short spin),
  decided here the way the command decides it, as the measurement starts;
* ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once), for comparison.

Each is measured quiet, then beside one busy process (a single-threaded Python loop: one core's worth of other
work on the machine, started 0.5 s before the measurement), rounds alternating; ``--late`` starts it 2 s after the
measurement's process instead (load that comes after the command started). Printed: images/s, and busy / quiet per setting (goal: >= 40%).

    python benchmarks/shared_machine.py                  # 256 images per measurement, 3 rounds
    python benchmarks/shared_machine.py --images 128 --rounds 2 --avx2   # AVX2 kernels forced
    python benchmarks/shared_machine.py --late           # the busy process starts after the measured one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "openmp default": {},
    "clipforge": "clipforge",
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
}
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

WORKER = r"""
import json, sys, time
import torch
from clipforge.config import load_config
from clipforge.data.base import ImageTextSource
from clipforge.eval.features import encode_source_images
from clipforge.data.processor import Processor
from clipforge.model.vision import resolve_image_preprocess
from clipforge.model.registry import create_model
from clipforge.packaged import packaged_available
from PIL import Image
import numpy as np

images = int(sys.argv[1])
overrides = [] if packaged_available("efficientnet-lite0") else ["model.image.pretrained=null"]
config = load_config("demo-lit", overrides + ["model.text.pretrained=null"])
model = create_model(config.model).eval()
processor = Processor(None, config.model.text.context_length, resolve_image_preprocess(config.model.image))  # images only
rng = np.random.default_rng(0)
pictures = [Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)) for _ in range(images)]

class Pictures:
    def __len__(self): return len(pictures)
    def load_image(self, i): return pictures[i]
    def captions(self, i): return ["x"]

source = Pictures()
encode_source_images(model, source, processor, batch_size=64)  # warm-up: kernels chosen, memory touched
start = time.perf_counter()
encode_source_images(model, source, processor, batch_size=64)
print(json.dumps({"images_per_second": images / (time.perf_counter() - start), "threads": torch.get_num_threads()}))
"""


def environment(setting: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in WAIT_VARIABLES}
    if SETTINGS[setting] == "clipforge":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from clipforge.cores import quiet_openmp_waits

        saved = dict(os.environ)
        for key in WAIT_VARIABLES:
            os.environ.pop(key, None)
        quiet_openmp_waits()
        env.update({key: os.environ[key] for key in WAIT_VARIABLES if key in os.environ})
        os.environ.clear()
        os.environ.update(saved)
    else:
        env.update(SETTINGS[setting])
    return env


AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def measure(setting: str, images: int, avx2: bool = False) -> float:
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(images)],
        env={**environment(setting), **(AVX2_ONLY if avx2 else {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every setting quiet and busy")
    parser.add_argument("--avx2", action="store_true", help="force AVX2 kernels (what an AVX2-only CPU runs)")
    parser.add_argument("--late", action="store_true", help="start the busy process 2 s after the measured one")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_model

    isa = ("AVX2 forced" if args.avx2 else "native kernels") + (", busy process started late" if args.late else "")
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores, {isa}; load average {os.getloadavg()[0]:.2f}")
    results: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            results.setdefault((setting, False), []).append(measure(setting, args.images, args.avx2))
            late = "import time; time.sleep(2)\n" if args.late else ""
            busy = subprocess.Popen([sys.executable, "-c", late + "while True: pass"])
            try:
                time.sleep(0 if args.late else 0.5)
                results.setdefault((setting, True), []).append(measure(setting, args.images, args.avx2))
            finally:
                busy.kill()
                busy.wait()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"{'setting':16s} {'quiet img/s':>12s} {'busy img/s':>11s} {'busy/quiet':>11s}   (medians of {args.rounds} rounds)"
    )
    for setting in SETTINGS:
        quiet = statistics.median(results[(setting, False)])
        busy = statistics.median(results[(setting, True)])
        print(f"{setting:16s} {quiet:12.1f} {busy:11.1f} {busy / quiet:10.0%}")


if __name__ == "__main__":
    main()
