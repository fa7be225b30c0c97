"""What evaluation costs beyond its towers: ``clipforge eval``'s own work against the forward passes it cannot avoid.

Data: ``--images`` synthetic JPEGs of 500x375 (``data_throughput.make_images``: COCO-like sizes, 10 class folders,
one caption of 6-14 words each) as a CSV manifest with a label column. Model: a ViT-B/32 CLIP (224 px, patch 32,
width 768, 12 layers; text 77 tokens, width 512, 12 layers; random weights: speed does not depend on them) with a
BPE tokenizer trained on the captions.

For each task, two measurements on the same model and thread count:

* ``towers``: the image tower over the images already decoded, resized, cropped and normalized (one tensor made
  before the clock starts), in the micro-batches evaluation feeds it (``forward_in_cpu_chunks``), plus the text
  tower over the texts the task embeds (zero-shot: the class prompts; retrieval: every caption), batched by
  length as evaluation batches them (``encode_text_batches``);
* ``eval``: the library call ``clipforge eval`` makes (``evaluate_zeroshot`` / ``evaluate_retrieval``) on the
  manifest: reading and decoding the files in ``--workers`` loader processes, the evaluation transform, the
  tokenizer, both towers and the metrics.

The ratio eval / towers is the overhead (target: at most 1.2x); after a warm-up pass, rounds alternate the two and
the medians are reported (a shared machine's load moves single rounds by 2x and more).

    python benchmarks/eval_overhead.py                   # 1,000 images, ViT-B/32, 1 loader worker, 3 rounds
    python benchmarks/eval_overhead.py --quick           # 64 images, the smoke-sized model: shows the script runs
    python benchmarks/eval_overhead.py --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_model
from _open_clip_sides import SIZES
from data_throughput import make_images

from clipforge.config import config_from_dict
from clipforge.data.manifest import ManifestSource
from clipforge.data.tokenize import train_bpe_tokenizer
from clipforge.eval.features import encode_text_batches
from clipforge.eval.runner import evaluate_retrieval, evaluate_zeroshot
from clipforge.model import create_model
from clipforge.model.factory import make_processor
from clipforge.runtime import forward_in_cpu_chunks

TEMPLATES = ["a photo of a {}.", "a picture of the {}.", "art of a {}."]


def labelled_manifest(root: Path, count: int) -> Path:
    """The images with their class folder as the label (``class_0`` .. ``class_9``)."""
    source = make_images(root, count, seed=0)
    rows = list(csv.DictReader(source.open()))
    manifest = root / "labelled.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label"])
        writer.writerows((row["image"], row["caption"], row["image"].split("/")[1]) for row in rows)
    return manifest


def build(arch_name: str, captions: list[str]):
    arch = SIZES[arch_name]
    config = config_from_dict({"model": arch.clipforge_model()})
    tokenizer = train_bpe_tokenizer(captions, vocab_size=1024)
    model = create_model(config.model, vocab_size=arch.vocab_size).eval()
    return model, make_processor(config.model, tokenizer), arch


@torch.inference_mode()
def towers(model, processor, pixels: torch.Tensor, texts: list[str], batch_size: int) -> float:
    """Seconds for the image tower over ``pixels`` and the text tower over ``texts``, as evaluation calls them."""
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        forward_in_cpu_chunks(model.encode_image, pixels[first : first + batch_size], torch.device("cpu"))
    encode_text_batches(model.encode_text, processor, list(dict.fromkeys(texts)), batch_size)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        manifest = labelled_manifest(Path(folder), args.images)
        source = ManifestSource(manifest)
        captions = [caption for index in range(len(source)) for caption in source.captions(index)]
        model, processor, arch = build(args.arch, captions)
        transform = processor.image_transform()
        pixels = torch.stack([transform(source.load_image(index)) for index in range(len(source))])
        prompts = [template.format(name) for name in source.classnames for template in TEMPLATES]
        tasks = {
            "zeroshot": (
                prompts,
                lambda: evaluate_zeroshot(model, processor, source, None, TEMPLATES, args.batch_size,
                                          num_workers=args.workers),
            ),
            "retrieval": (
                captions,
                lambda: evaluate_retrieval(model, processor, source, args.batch_size, num_workers=args.workers),
            ),
        }  # fmt: skip
        towers(model, processor, pixels[: args.batch_size], prompts, args.batch_size)  # warm-up: first-call costs
        rows = []
        for task, (texts, evaluate) in tasks.items():
            tower_times, eval_times = [], []
            for _ in range(args.rounds):
                tower_times.append(towers(model, processor, pixels, texts, args.batch_size))
                start = time.perf_counter()
                evaluate()
                eval_times.append(time.perf_counter() - start)
            tower, evaluation = statistics.median(tower_times), statistics.median(eval_times)
            rows.append(
                {
                    "task": task,
                    "images": len(source),
                    "texts": len(set(texts)),
                    "towers_s": round(tower, 2),
                    "eval_s": round(evaluation, 2),
                    "ratio": round(evaluation / tower, 3),
                    "tower_rounds": [round(t, 2) for t in tower_times],
                    "eval_rounds": [round(t, 2) for t in eval_times],
                }
            )
    return {"arch": arch.describe(), "cpu": cpu_model(), "threads": args.threads, "workers": args.workers,
            "batch_size": args.batch_size, "load_average": os.getloadavg(), "results": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--arch", choices=sorted(SIZES), default="B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="evaluation's loader processes (1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (all cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 images, the smoke-sized model")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.arch, args.rounds = 64, "smoke", 1
    load_before = os.getloadavg()[0]
    result = run(args)
    result["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"{result['arch']}; {result['cpu']}, {args.threads} threads, {args.workers} loader worker(s), "
          f"load average {result['load_average'][0]} before, {result['load_average'][1]} after")  # fmt: skip
    print(f"{'task':<10} {'images':>6} {'texts':>6} {'towers s':>9} {'eval s':>8} {'eval / towers':>14}")
    for row in result["results"]:
        print(f"{row['task']:<10} {row['images']:>6} {row['texts']:>6} {row['towers_s']:>9.2f} {row['eval_s']:>8.2f} "
              f"{row['ratio']:>13.3f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
