"""Search latency over an embedding folder of N float16 vectors, and image-embedding throughput of a model.

1. Exact search (``clipforge.search.exact.exact_search``): N random unit vectors (D=512, float16) are written
   as an embedding folder in a temporary directory (1M x 512 x 2 bytes = 1 GB) and memory-mapped. Reported:
   the median wall and CPU time of ``--queries`` single queries (top-10; the float16 scanner), against the
   streaming-read floor of the same bytes and torch's float16 ``mv`` timed in the same rounds, and the
   per-query time when the same queries go in one batch (float32 blocks). Runs for each ``--workers`` value,
   with ``torch.set_num_threads(--threads)``.
2. FAISS: ``clipforge index build`` (IVF, SQfp16, nprobe tuned to recall@10 >= 0.95
   on stored rows), then the median single-query latency and recall@10 against exact search on fresh queries.
   Random unit vectors in 512-d have no neighbourhood structure (every point is almost equally far from every
   other), which is the worst case for any index, so FAISS is also measured on ``--clusters`` Gaussian clusters (``--spread``),
   closer to real embeddings; queries are then fresh points of the same clusters.
3. Embedding throughput: images/s of ``encode_source_images`` with ``--embed-recipe``'s model (default
   ``demo-lit``: EfficientNet-Lite0, the model ``clipforge demo`` trains) on the built-in emoji images; for a
   convolutional tower also with plain NCHW input, in alternating rounds, and the channels-last speedup.

    python benchmarks/search_speed.py                        # 1M items, 2 threads, everything
    python benchmarks/search_speed.py --items 200000 --no-faiss --no-embed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from clipforge.search.exact import _shares, exact_search
from clipforge.search.store import EmbeddingStore


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def make_store(folder: Path, items: int, dim: int, clusters: int, spread: float, seed: int) -> EmbeddingStore:
    """An embedding folder of ``items`` unit float16 vectors: uniform on the sphere, or around ``clusters`` centres."""
    store = EmbeddingStore.open_for_model(
        folder, {"checkpoint": "synthetic", "step": 0, "fingerprint": "synthetic", "embed_dim": dim}, "float16"
    )
    generator = np.random.default_rng(seed)
    centres = sample_points(generator, clusters, dim, None, spread) if clusters else None
    part = 262144  # a few parts, as a resumed embedding run leaves them
    for start in range(0, items, part):
        count = min(part, items - start)
        vectors = sample_points(generator, count, dim, centres, spread)
        store.write_part("images", vectors.astype(np.float16), [{"id": str(start + i)} for i in range(count)])
    return store


def sample_points(
    generator: np.random.Generator, count: int, dim: int, centres: np.ndarray | None, spread: float = 1.0
) -> np.ndarray:
    points = generator.standard_normal((count, dim), dtype=np.float32)
    if centres is not None:
        # noise of norm about ``spread`` around a unit centre: cosine to the centre about 1 / sqrt(1 + spread^2)
        points = centres[generator.integers(len(centres), size=count)] + points * (spread / math.sqrt(dim))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


class StreamingRead:
    """The floor of a single query: one call reads every stored byte once, with ``workers`` threads each
    summing an equal share of the rows, in 65,536-row blocks, as int64 words (one add per 8 bytes:
    memory-bound, not compute-bound), torch single-threaded inside each, as ``exact_search`` splits its rows."""

    def __init__(self, matrices: list[np.ndarray], workers: int) -> None:
        # the very shares exact_search streams (its private splitter: the floor must read what the query reads)
        self.shares = [
            [matrix[start : start + rows] for matrix, start, _, rows in share]
            for share in _shares(matrices, 65536, workers)
        ]
        self.pool = ThreadPoolExecutor(len(self.shares))

    @staticmethod
    def _read(share: list[np.ndarray]) -> int:
        torch.set_num_threads(1)
        return sum(int(torch.from_numpy(np.ascontiguousarray(b)).view(torch.int64).sum()) for b in share)

    def __call__(self) -> None:
        list(self.pool.map(self._read, self.shares))

    def product(self, query16: torch.Tensor) -> None:
        """torch's float16 ``mv`` of every block with ``query16``, the same threads and shares (a reference)."""

        def multiply(share: list[np.ndarray]) -> None:
            torch.set_num_threads(1)
            for block in share:
                torch.mv(torch.from_numpy(np.ascontiguousarray(block)), query16)

        list(self.pool.map(multiply, self.shares))


def time_exact(matrices: list[np.ndarray], queries: torch.Tensor, k: int, workers: int) -> dict:
    """Single queries (the float16 scanner ``Index`` runs), with the streaming-read floor of the same bytes and
    the same threads timed side by side: one floor pass after each query (a machine whose memory speed drifts
    moves both), and the ratio of the medians. For reference, torch's float16 matrix-vector product over the
    same shares (the product alone, no top-k) is timed in the same rounds. Then all queries in one batch."""
    exact_search(matrices, queries[:1], k, workers=workers)  # page the file in once, as a warm server has it
    floor_read = StreamingRead(matrices, workers)
    floor_read()
    single, cpu, floor, torch_mv = [], [], [], []
    for query in queries:
        started, cpu_started = time.perf_counter(), time.process_time()
        exact_search(matrices, query[None], k, workers=workers)
        single.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        started = time.perf_counter()
        floor_read()
        floor.append(time.perf_counter() - started)
        started = time.perf_counter()
        floor_read.product(query.half())
        torch_mv.append(time.perf_counter() - started)
    floor_read.pool.shutdown()
    started = time.perf_counter()
    exact_search(matrices, queries, k, workers=workers)
    batched = time.perf_counter() - started
    return {
        "single_query_kernel": "float16 scanner (FAISS)",
        "workers": workers,
        "streaming_read_floor_ms": 1000 * statistics.median(floor),
        "vs_floor": statistics.median(single) / statistics.median(floor),
        "single_query_median_ms": 1000 * statistics.median(single),
        "single_query_p90_ms": 1000 * sorted(single)[int(0.9 * len(single))],
        # CPU time of all threads: on a machine shared with other jobs, wall time / CPU time shows the share
        # of the cores this process got; CPU time / workers is the latency on otherwise idle cores
        "single_query_median_cpu_ms": 1000 * statistics.median(cpu),
        "torch_float16_mv_ms": 1000 * statistics.median(torch_mv),
        "torch_float16_mv_vs_floor": statistics.median(torch_mv) / statistics.median(floor),
        "batched_ms_per_query": 1000 * batched / len(queries),
    }


def time_faiss(store: EmbeddingStore, queries: torch.Tensor, k: int) -> dict:
    from clipforge.search.ann import faiss_search, load_faiss_index
    from clipforge.search.ann_build import build_faiss_index

    report = build_faiss_index(store, "images", "ivf")
    index = load_faiss_index(store, "images")
    matrices = store.matrices("images")
    _, truth = exact_search(matrices, queries, k, workers=2)
    latencies, recalls = [], []
    for query, expected in zip(queries, truth, strict=True):
        started = time.perf_counter()
        _, rows = faiss_search(index, query[None], k)
        latencies.append(time.perf_counter() - started)
        recalls.append(len(set(rows[0]) & set(expected)) / len(expected))
    return {
        "factory": report.factory,
        report.knob: report.value,
        "build_s": report.seconds,
        "single_query_median_ms": 1000 * statistics.median(latencies),
        "recall_at_10": float(np.mean(recalls)),
    }


def embedding_throughput(batch_size: int, images: int, recipe: str = "demo-lit", rounds: int = 3) -> dict:
    """images/s of ``encode_source_images`` with ``recipe``'s model, channels-last input (the default) and
    plain NCHW input side by side: ``rounds`` alternating rounds of each, medians and their ratio."""
    from clipforge.config import load_config
    from clipforge.data.emoji import EmojiSource
    from clipforge.eval.features import encode_source_images
    from clipforge.model import create_model
    from clipforge.runtime import keep_freed_memory_in_the_heap

    keep_freed_memory_in_the_heap()  # as `clipforge embed` runs
    config = load_config(recipe)
    model = create_model(config.model, config.loss.kind, vocab_size=config.model.text.tokenizer.vocab_size).eval()
    source = EmojiSource("all")
    subset = _First(source, images)
    from clipforge.data.tokenize import train_bpe_tokenizer
    from clipforge.model.factory import make_processor

    # the image side only: any tokenizer completes the processor
    processor = make_processor(config.model, train_bpe_tokenizer(["an emoji"] * 4, 260))
    encode_source_images(model, _First(source, batch_size), processor, batch_size)  # warm-up
    rates: dict[bool, list[float]] = {True: [], False: []}
    layouts = model.image_tower.channels_last, False
    for _ in range(rounds):
        for channels_last in layouts:
            model.image_tower.channels_last = channels_last
            started = time.perf_counter()
            encode_source_images(model, subset, processor, batch_size)
            rates[channels_last].append(len(subset) / (time.perf_counter() - started))
    model.image_tower.channels_last = layouts[0]
    result = {"model": f"{recipe} recipe ({model.image_tower.describe()})", "images": len(subset)}
    result["images_per_s"] = statistics.median(rates[layouts[0]])
    if layouts[0]:  # a convolutional tower: the layout's own gain, measured side by side
        result["nchw_images_per_s"] = statistics.median(rates[False])
        result["channels_last_speedup"] = result["images_per_s"] / result["nchw_images_per_s"]
    return result


class _First:
    """The first ``count`` images of a source (cycled when it has fewer)."""

    labels = None
    classnames = None

    def __init__(self, source, count: int) -> None:
        self.source, self.count = source, count

    def __len__(self) -> int:
        return self.count

    def load_image(self, index: int):
        return self.source.load_image(index % len(self.source))

    def captions(self, index: int) -> list[str]:
        return self.source.captions(index % len(self.source))

    def describe(self, index: int) -> str:
        return self.source.describe(index % len(self.source))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="exact_search worker threads")
    parser.add_argument("--clusters", type=int, default=10000, help="clusters of the second FAISS data set")
    parser.add_argument("--spread", type=float, default=0.7, help="noise norm around a cluster centre")
    parser.add_argument("--no-exact", action="store_true")
    parser.add_argument("--clustered-only", action="store_true", help="FAISS on the clustered set only")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--no-embed", action="store_true")
    parser.add_argument("--embed-images", type=int, default=1024)
    parser.add_argument("--embed-batch", type=int, default=64)
    parser.add_argument("--embed-recipe", default="demo-lit", help="whose model embeds (demo-lit: EfficientNet-Lite0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"items": args.items, "dim": args.dim, "threads": args.threads, "machine": load_average()}
    generator = np.random.default_rng(args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="clipforge-search-bench-") as folder:
        store = make_store(Path(folder) / "random", args.items, args.dim, 0, args.spread, args.seed)
        queries = torch.from_numpy(sample_points(generator, args.queries, args.dim, None))
        matrices = store.matrices("images")
        if not args.no_exact:
            results["exact"] = [time_exact(matrices, queries, args.k, workers) for workers in args.workers]
            print(json.dumps(results["exact"]), flush=True)
        if not args.no_faiss:
            if not args.clustered_only:
                results["faiss_random"] = time_faiss(store, queries, args.k)
                print(json.dumps(results["faiss_random"]), flush=True)
            del matrices
            clustered = make_store(
                Path(folder) / "clustered", args.items, args.dim, args.clusters, args.spread, args.seed
            )
            centres_generator = np.random.default_rng(args.seed)  # the same centres as the store
            centres = sample_points(centres_generator, args.clusters, args.dim, None)
            cluster_queries = torch.from_numpy(sample_points(generator, args.queries, args.dim, centres, args.spread))
            results["faiss_clustered"] = time_faiss(clustered, cluster_queries, args.k)
            print(json.dumps(results["faiss_clustered"]), flush=True)
    if not args.no_embed:
        results["embedding"] = embedding_throughput(args.embed_batch, args.embed_images, args.embed_recipe)
    results["machine_after"] = load_average()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
