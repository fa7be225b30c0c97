"""Embedding with several processes: ``torchrun --nproc-per-node 2 -m clipforge embed`` against one ``clipforge embed``
on the same cores, with small towers.

The setting: a 2-core CPU machine, ``--images`` synthetic 96 px PNG files, a model with small towers (a ViT of 64 px,
patch 8, width 128, 4 blocks; trained one step from random weights: only its speed matters here), decoding in the
embedding processes (``--workers 0``). One process runs with both cores as torch threads (``OMP_NUM_THREADS=2``), and
again with one thread (on a busy machine, threads that wait at OpenMP barriers can make two threads slower than one:
this is the better single-process figure there); under torchrun each of the two processes gets one thread
(torchrun's own default). Rounds alternate the settings, each into a fresh folder, and the folders are checked to
hold the same bits.

Reported, per setting: the embedding's own time (``clipforge embed`` logs it: every process, from the first plan to
the last part; the input's scan and the model's loading excluded) and the whole command's wall time (interpreter,
imports, torchrun's rendezvous included), as images/s; the ratio of the medians is the speed-up against each
single-process setting (goal >= 1.7x against the faster). On a machine that other jobs share, figures move with the
load (printed before and after).

    python benchmarks/embed_scale.py                      # 6000 images, 3 rounds
    python benchmarks/embed_scale.py --images 2000 --rounds 1 --json embed_scale.json
    python benchmarks/embed_scale.py --quick              # 200 images, 1 round: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

LOGGED = re.compile(r"embedded (\d+) images in ([0-9.]+) s")
SMALL_TOWERS = {
    "embed_dim": 64,
    "image": {"kind": "vit", "image_size": 64, "patch_size": 8, "width": 128, "depth": 4, "heads": 2},
    "text": {
        "kind": "transformer",
        "width": 64,
        "depth": 1,
        "heads": 2,
        "context_length": 16,
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6000, help="images to embed per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--processes", type=int, default=2, help="torchrun processes (and the one process's threads)")
    parser.add_argument("--quick", action="store_true", help="200 images, 1 round: checks that the script runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 200, 1
    return args


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def write_images(folder: Path, count: int) -> Path:
    """``count`` distinct 96 px pictures (smooth colour fields), as PNG files."""
    folder.mkdir(parents=True)
    grid = np.linspace(0.0, 1.0, 96, dtype=np.float32)
    for number in range(count):
        weights = np.random.default_rng(number).uniform(-2, 2, size=(3, 3))
        field = weights[:, 0, None, None] * grid[None, :, None] + weights[:, 1, None, None] * grid[None, None, :]
        pixels = ((np.sin(3 * field + weights[:, 2, None, None]) + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"{number:06d}.png")
    return folder


def small_checkpoint(folder: Path, images: Path) -> Path:
    """A checkpoint of the small towers: one training step on a few of the pictures (random weights otherwise)."""
    from clipforge.config import config_from_dict
    from clipforge.train.loop import train

    manifest = folder / "train.csv"
    names = sorted(path.name for path in images.iterdir())[:64]
    manifest.write_text("image,caption\n" + "".join(f"{images / n},picture {i % 7}\n" for i, n in enumerate(names)))
    config = config_from_dict(
        {
            "model": SMALL_TOWERS,
            "data": {"kind": "manifest", "path": str(manifest)},
            "train": {"steps": 1, "batch_size": 16, "output_dir": str(folder / "run"), "checkpoint_every": 1},
            "logging": {"backends": [], "progress": False},
        }
    )
    return train(config).checkpoint


def embed(processes: int, threads: int, checkpoint: Path, images: Path, out: Path) -> dict:
    """One ``clipforge embed`` (under torchrun for several processes): its logged embedding time and its wall."""
    arguments = ["embed", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out)]
    launcher = [sys.executable, "-m", "clipforge"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}", "-m", "clipforge"]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    finished = subprocess.run([*launcher, *arguments], env=environment, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{' '.join(launcher + arguments)} failed:\n{finished.stderr[-3000:]}")
    found = LOGGED.search(finished.stderr)
    if found is None:
        raise SystemExit(f"no 'embedded N images in S s' line in the output:\n{finished.stderr[-3000:]}")
    count, seconds = int(found.group(1)), float(found.group(2))
    return {"images": count, "embedding_s": seconds, "wall_s": wall}


def same_bits(first: Path, second: Path) -> bool:
    files = sorted(path.name for path in (first / "images").glob("part-*"))
    return files == sorted(path.name for path in (second / "images").glob("part-*")) and all(
        (first / "images" / name).read_bytes() == (second / "images" / name).read_bytes() for name in files
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results: dict = {"cpu": cpu_model(), "load_before": load_average(), "images": args.images, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="embed-scale-") as scratch:
        folder = Path(scratch)
        images = write_images(folder / "images", args.images)
        checkpoint = small_checkpoint(folder, images)
        settings = {  # name: (processes, threads each)
            f"1 process, {args.processes} threads": (1, args.processes),
            "1 process, 1 thread": (1, 1),
            f"{args.processes} processes, 1 thread each": (args.processes, 1),
        }
        many = list(settings)[-1]
        for round_number in range(args.rounds):
            measured = {}
            for number, (name, (processes, threads)) in enumerate(settings.items()):
                out = folder / f"round{round_number}-{number}"
                measured[name] = embed(processes, threads, checkpoint, images, out)
                measured[name]["same_bits_as_the_first"] = same_bits(folder / f"round{round_number}-0", out)
            results["rounds"].append(measured)
            print(f"round {round_number + 1}: {json.dumps(measured)}", flush=True)
    results["load_after"] = load_average()
    summary: dict = {}
    for key in ("embedding_s", "wall_s"):
        medians = {name: statistics.median(r[name][key] for r in results["rounds"]) for name in settings}
        summary[key] = {
            "images_per_s": {name: args.images / seconds for name, seconds in medians.items()},
            "speedup": {f"{many} vs {name}": medians[name] / medians[many] for name in settings if name != many},
        }
    results["summary"] = summary
    same = all(measured[name]["same_bits_as_the_first"] for measured in results["rounds"] for name in settings)
    print(
        f"{results['cpu']}; {args.images} images, {args.rounds} rounds; {results['load_before']} -> {results['load_after']}"
    )
    for key, what in (("embedding_s", "embedding"), ("wall_s", "whole command")):
        rates = ", ".join(f"{name} {rate:.0f}" for name, rate in summary[key]["images_per_s"].items())
        ratios = ", ".join(f"{ratio:.2f}x {pair}" for pair, ratio in summary[key]["speedup"].items())
        print(f"{what}: images/s {rates}; {ratios}")
    print(f"the same bits in every folder: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
