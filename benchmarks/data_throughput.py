"""Images per second through the full training data pipeline, against a plain torchvision baseline.

Three loaders read the same JPEG images (500x375, like COCO's) and produce 224 px training crops:

* ``torchvision``: the baseline, ``datasets.ImageFolder`` + ``transforms.Compose([RandomResizedCrop, ToTensor,
  Normalize])`` + ``DataLoader`` (shuffled), with the same crop scale and interpolation as clipforge's;
* ``clipforge-folder``: ``build_train_loader`` over a manifest of the image files (decode with EXIF and mode
  handling, the seeded per-sample augmentation, one caption per image tokenized and padded in the workers);
* ``clipforge-shards``: the same pipeline over WebDataset shards of the same files (``clipforge data pack``).

Each loader runs with 0, 1 and 2 workers. The clock starts after a warm-up (worker start, first batches) and
stops after ``--measure-images`` images; each configuration is measured ``--rounds`` times, interleaved, and
the best round is reported (the median beside it), as the machine may be shared. Every loading process uses
one torch thread (loader workers do by default; the main process is set to it), so "per worker" rates compare.

    python benchmarks/data_throughput.py                      # 512 images, 0/1/2 workers, 3 rounds
    python benchmarks/data_throughput.py --images 256 --rounds 1 --json results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets
from torchvision import transforms as T

from clipforge.config import AugmentConfig, data_config_from_dict
from clipforge.data.loader import LoaderSpec, build_train_loader
from clipforge.data.pack import pack_source
from clipforge.data.processor import Processor
from clipforge.data.sources import build_source
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.data.transforms import ImagePreprocess
from clipforge.model.vision import CLIP_MEAN, CLIP_STD

WORDS = "a the photo of dog cat man woman street table red blue green small large sitting on near with two".split()


def make_images(root: Path, count: int, seed: int) -> Path:
    """``count`` JPEGs of 500x375 (quality 90, ~90 KB: smooth colour fields plus noise) in 10 class folders,
    and a CSV manifest giving each a caption of 6-14 words."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        fields = np.kron(rng.random((12, 16, 3)), np.ones((32, 32, 1)))[:375, :500] * 200  # (375, 500, 3)
        pixels = np.clip(fields + rng.normal(0, 20, fields.shape), 0, 255).astype(np.uint8)
        name = f"images/class_{index % 10}/{index:05d}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name, quality=90)
        rows.append((name, " ".join(rng.choice(WORDS, size=int(rng.integers(6, 15))))))
    with (root / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([("image", "caption"), *rows])
    return root / "train.csv"


def baseline_loader(folder: Path, args: argparse.Namespace, workers: int) -> DataLoader:
    interpolation = T.InterpolationMode.BICUBIC if args.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    transform = T.Compose(
        [
            T.RandomResizedCrop(args.size, scale=(args.scale_min, 1.0), interpolation=interpolation),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    sampler = RandomSampler(dataset, num_samples=len(dataset) * 100)  # several epochs: no restart while measured
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=True,
    )


def measure(loader: DataLoader, args: argparse.Namespace, workers: int) -> float:
    """Images per second after a warm-up of two batches per worker (the first includes starting the workers)."""
    batches = iter(loader)
    for _ in islice(batches, 2 * max(1, workers)):
        pass
    count, images = args.measure_images // args.batch_size, 0
    start = time.perf_counter()
    for batch in islice(batches, count):
        images += len(batch[0]) if isinstance(batch, list) else len(batch) + len(batch.skipped)
    elapsed = time.perf_counter() - start
    del batches  # stops the workers
    return images / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="JPEGs written (500x375)")
    parser.add_argument("--measure-images", type=int, default=512, help="images timed per configuration")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="measurements per configuration; the best is kept")
    parser.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    parser.add_argument("--scale-min", type=float, default=0.8, help="RandomResizedCrop area range (scale_min, 1)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_images(root, args.images, args.seed)
        folder_config = data_config_from_dict({"kind": "manifest", "path": str(manifest)})
        packed = pack_source(folder_config, root / "shards", shard_size=args.shard_size)
        shards_config = data_config_from_dict({"kind": "webdataset", "path": packed.spec, "shuffle_buffer": 256})
        sources = {"clipforge-folder": build_source(folder_config), "clipforge-shards": build_source(shards_config)}
        folder_source = sources["clipforge-folder"]
        captions = [c for i in range(len(folder_source)) for c in folder_source.captions(i)]
        tokenizer = train_bpe_tokenizer(captions, vocab_size=1024)
        preprocess = ImagePreprocess(args.size, CLIP_MEAN, CLIP_STD, args.interpolation)
        processor, augment = Processor(tokenizer, 77, preprocess), AugmentConfig(scale_min=args.scale_min)

        def loader(name: str, workers: int) -> DataLoader:
            if name == "torchvision":
                return baseline_loader(root / "images", args, workers)
            spec = LoaderSpec(processor, augment, args.batch_size, seed=args.seed, num_workers=workers)
            return build_train_loader(sources[name], spec)

        names = ["torchvision", "clipforge-folder", "clipforge-shards"]
        rates: dict[tuple[str, int], list[float]] = {(name, w): [] for w in args.workers for name in names}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for workers in args.workers:
                for name in names:
                    rates[name, workers].append(measure(loader(name, workers), args, workers))
        load_after = os.getloadavg()

    print(
        f"{args.images} JPEGs 500x375 -> {args.size} px ({args.interpolation}), batch {args.batch_size}, "
        f"best of {args.rounds} rounds of {args.measure_images // args.batch_size * args.batch_size} images; "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    header = (
        f"{'workers':>7}  {'loader':<17} {'images/s':>9}  {'median':>7}  {'per worker':>10}  {'vs torchvision':>14}"
    )
    print(header)
    results = []
    for workers in args.workers:
        for name in names:
            rate, median = max(rates[name, workers]), float(np.median(rates[name, workers]))
            ratio = rate / max(rates["torchvision", workers])
            per_worker = rate / max(1, workers)
            print(f"{workers:>7}  {name:<17} {rate:>9.1f}  {median:>7.1f}  {per_worker:>10.1f}  {ratio:>13.2f}x")
            results.append(
                {"loader": name, "workers": workers, "images_per_second": rate, "rounds": rates[name, workers]}
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
