"""Wall time and peak memory of blockwise `retrieval_metrics` against the naive full score matrix.

Each measurement runs in a fresh subprocess, so the peak resident memory (VmHWM in /proc/self/status, reset
after the data is made) belongs to that method alone; on CUDA the peak of torch's allocator is reported.
The naive method builds the whole (N_txt, N_img) float32 score matrix plus masks; where that does not fit in
the memory available, it is run on the first --naive-images images only, checked against the blockwise result
on that same subset, and its full-size time and memory are extrapolated (both grow with N_img * N_txt).

Data: random unit image embeddings; each caption is its image plus Gaussian noise of norm about --noise,
renormalized, so recall is neither 0 nor 1.

    python benchmarks/eval_speed.py                                  # 50k images x 250k captions, D=512
    python benchmarks/eval_speed.py --images 10000 --naive-images 5000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch

from clipforge.eval.retrieval import rank_summary, retrieval_metrics

# Bytes per (caption, image) pair the naive method holds at its peak, measured (VmHWM) on CPU: the float32
# scores, bool masks and comparisons, and the int64 copy torch makes when it sums a bool matrix on CPU.
NAIVE_BYTES_PER_PAIR = 14
KS = (1, 5, 10)


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(args.seed)
    image_features = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator), dim=-1)
    text_to_image = torch.arange(args.images).repeat_interleave(args.captions_per_image)
    text_features = torch.empty(len(text_to_image), args.dim)
    # Chunked so the data's own temporaries stay small next to what the methods allocate.
    chunk = 65536
    for start in range(0, len(text_to_image), chunk):
        images = image_features[text_to_image[start : start + chunk]]
        noise = torch.randn(images.shape, generator=generator) * (args.noise / math.sqrt(args.dim))
        text_features[start : start + chunk] = torch.nn.functional.normalize(images + noise, dim=-1)
    device = torch.device(args.device)
    return image_features.to(device), text_features.to(device), text_to_image.to(device)


def naive_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> dict:
    """The same definitions on the full (N_txt, N_img) matrix: the reference and the cost to beat."""
    scores = text_features @ image_features.T  # (N_txt, N_img): the matrix the blockwise code never builds
    own = scores.gather(1, text_to_image[:, None])
    image_ranks = (scores >= own).sum(dim=1)
    is_correct = text_to_image[:, None] == torch.arange(scores.shape[1], device=scores.device)
    best = scores.masked_fill(~is_correct, float("-inf")).amax(dim=0)  # (N_img,)
    text_ranks = 1 + ((scores >= best) & ~is_correct).sum(dim=0)
    metrics = rank_summary(image_ranks, KS, prefix="image_retrieval_")
    metrics.update(rank_summary(text_ranks, KS, prefix="text_retrieval_"))
    return metrics


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = make_data(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        try:  # "5" resets the peak RSS (Linux >= 4.0), so data generation does not count as the method's peak
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass
        baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if args.worker == "naive":
        metrics = naive_metrics(*data)
    else:
        metrics = retrieval_metrics(*data, ks=KS, block_size=args.block_size)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "extra_bytes": peak - baseline, "metrics": metrics}))


def run_worker(args: argparse.Namespace, method: str, images: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--images", str(images)]
    for name in ("captions_per_image", "dim", "block_size", "threads", "device", "seed", "noise"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def max_metric_difference(first: dict, second: dict) -> float:
    return max(abs(first[key] - second[key]) for key in first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--naive-images", type=int, default=10_000, help="subset size when the naive run won't fit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=5.0, help="norm of the noise added to make a caption")
    parser.add_argument("--worker", choices=["blockwise", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    gib = 2**30
    captions = args.images * args.captions_per_image
    naive_need = args.images * captions * NAIVE_BYTES_PER_PAIR
    free = available_bytes(args.device)
    print(
        f"{args.images} images x {captions} captions, D={args.dim}, block_size={args.block_size}, "
        f"device={args.device}, threads={args.threads}; naive needs ~{naive_need / gib:.1f} GiB, "
        f"{free / gib:.1f} GiB available"
    )
    rows = [("blockwise", args.images, run_worker(args, "blockwise", args.images))]
    naive_fits = naive_need < 0.7 * free
    if naive_fits:
        rows.append(("naive", args.images, run_worker(args, "naive", args.images)))
    subset = min(args.naive_images, args.images)
    if not naive_fits or subset < args.images:
        rows.append(("blockwise", subset, run_worker(args, "blockwise", subset)))
        rows.append(("naive", subset, run_worker(args, "naive", subset)))

    print(
        f"\n{'method':<10} {'images':>8} {'captions':>9} {'time s':>8} {'peak GiB':>9} {'extra GiB':>9} "
        f"{'i2t R@1':>8} {'t2i R@1':>8}"
    )
    for method, images, result in rows:
        if "error" in result:
            print(f"{method:<10} {images:>8} {images * args.captions_per_image:>9}  {result['error']}")
            continue
        metrics = result["metrics"]
        print(
            f"{method:<10} {images:>8} {images * args.captions_per_image:>9} {result['seconds']:>8.2f} "
            f"{result['peak_bytes'] / gib:>9.2f} {result['extra_bytes'] / gib:>9.2f} "
            f"{metrics['text_retrieval_recall@1']:>8.4f} {metrics['image_retrieval_recall@1']:>8.4f}"
        )
    if not naive_fits:
        print(f"{'naive':<10} {args.images:>8} {captions:>9}  does not fit: needs ~{naive_need / gib:.1f} GiB")

    # Same-size pairs must agree: same definitions, only the blocking differs.
    by_size: dict[int, dict[str, dict]] = {}
    for method, images, result in rows:
        if "metrics" in result:
            by_size.setdefault(images, {})[method] = result
    print()
    for images, results in sorted(by_size.items()):
        if len(results) == 2:
            difference = max_metric_difference(results["blockwise"]["metrics"], results["naive"]["metrics"])
            verdict = "equal" if difference == 0 else ("equal within 1e-6" if difference < 1e-6 else "DIFFERENT")
            print(f"{images} images: blockwise vs naive metrics {verdict} (max |difference| {difference:.2e})")
    if subset in by_size and "naive" in by_size[subset] and subset < args.images:
        scale = args.images * captions / (subset * subset * args.captions_per_image)
        naive = by_size[subset]["naive"]
        print(
            f"naive at full size, extrapolated from {subset} images (x{scale:.0f} pairs): "
            f"~{naive['seconds'] * scale:.0f} s, ~{naive['extra_bytes'] * scale / gib:.1f} GiB extra"
        )


if __name__ == "__main__":
    main()
