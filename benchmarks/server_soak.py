"""Soak test of ``clipforge serve`` under hostile load: the server's memory after bursts of large-image requests,
slow clients, and the status codes it answered. Run by hand (not by the tests).

Unless ``--index`` and ``--checkpoint`` are given, it builds in a temporary folder: 24 small pictures, one
``--megapixels`` JPEG and one PNG of the same size (generated with PIL), a tiny model trained a few steps on the
small ones (``clipforge train``'s own loop), and the index of all 26 (``clipforge embed``'s). Then it starts
``python -m clipforge serve`` on 127.0.0.1 on a free port as a subprocess (``--env`` passes it environment
variables, e.g. glibc's ``MALLOC_MMAP_THRESHOLD_`` to try another heap setting) and runs bounded phases:

1. ``warm-up``: every kind of request once on the small pictures; the server's RSS then is the baseline.
2. ``large images``: thumbnails and explains of the two large images, one at a time (the per-request latency).
3. ``burst``: ``--rounds`` rounds of ``--concurrency`` concurrent requests, a mix of thumbnails and explains
   of the large images, searches and similar-image queries.
4. ``slow clients``: ``--slow`` sockets (more than the server's 64 connections) send a partial request and then a
   byte every second, while normal requests keep coming; reports how many the server dropped and when.
5. ``burst`` again, then ``idle`` (a few seconds without requests).

After each phase: the server's RSS and peak RSS (``VmRSS``, ``VmHWM`` of /proc/<pid>/status) and the status
codes of that phase (``error`` counts a normal request that got no answer). At the end it checks: no 500, no
normal request without an answer, every slow client dropped, and the RSS after the bursts within
``--rss-bound-mb`` of the baseline; exit code 1 if one fails.

    python benchmarks/server_soak.py                        # 36-megapixel images, ~2 minutes on 2 cores
    python benchmarks/server_soak.py --quick                # 12-megapixel images, fewer rounds
    python benchmarks/server_soak.py --env MALLOC_MMAP_THRESHOLD_=33554432 --env MALLOC_TRIM_THRESHOLD_=1073741824
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _machine import cpu_model
from PIL import Image, ImageDraw

REQUEST_TIMEOUT_S = 60.0
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 20)}


# -- the index ----------------------------------------------------------------------------------------------
def large_pictures(folder: Path, megapixels: float) -> list[Path]:
    """A JPEG and a PNG of ``megapixels``, square, with smooth gradients and edges (so they compress like photos
    and a PNG stays small on disk while decoding to 3 bytes a pixel)."""
    side = int((megapixels * 1e6) ** 0.5)
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([x * 255 // side, y * 255 // side, (x ^ y) & 255], axis=-1).astype(np.uint8)
    picture = Image.fromarray(pixels)
    ImageDraw.Draw(picture).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=COLOURS["red"])
    paths = [folder / "large_photo.jpg", folder / "large_scan.png"]
    picture.save(paths[0], quality=90)
    picture.save(paths[1], compress_level=1)
    return paths


def small_pictures(folder: Path) -> list[tuple[Path, str]]:
    """24 small pictures (colour x shape x size) with a caption each."""
    rows = []
    for colour, fill in COLOURS.items():
        for shape in ("circle", "square", "triangle"):
            for size, radius in (("small", 8), ("large", 14)):
                picture = Image.new("RGB", (32, 32), "white")
                box = (16 - radius, 16 - radius, 16 + radius, 16 + radius)
                draw = ImageDraw.Draw(picture)
                if shape == "circle":
                    draw.ellipse(box, fill=fill)
                elif shape == "square":
                    draw.rectangle(box, fill=fill)
                else:
                    draw.polygon([(16, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
                path = folder / f"{size}_{colour}_{shape}.png"
                picture.save(path)
                rows.append((path, f"a {size} {colour} {shape}"))
    return rows


def build_index(root: Path, megapixels: float) -> tuple[Path, Path]:
    """(embedding folder, checkpoint) of a tiny model over the small and the large pictures."""
    from clipforge.config import config_from_dict
    from clipforge.interop.load import load_checkpoint
    from clipforge.search.embed import embed_images
    from clipforge.train.loop import train

    images = root / "images"
    images.mkdir()
    rows = small_pictures(images)
    large_pictures(images, megapixels)
    manifest = root / "train.csv"
    manifest.write_text("image,caption\n" + "".join(f"images/{path.name},{caption}\n" for path, caption in rows))
    tiny = {"width": 48, "depth": 2, "heads": 2}
    config = config_from_dict(
        {
            "model": {
                "embed_dim": 32,
                "image": {"kind": "vit", "image_size": 32, "patch_size": 8, **tiny},
                "text": {"kind": "transformer", "context_length": 16, "tokenizer": {"kind": "bpe", "vocab_size": 300}}
                | tiny,
            },
            "data": {"kind": "manifest", "path": str(manifest)},
            "train": {"steps": 5, "batch_size": 8, "output_dir": str(root / "run"), "checkpoint_every": 5},
            "logging": {"log_every": 5, "backends": [], "progress": False},
        }
    )
    checkpoint = train(config).checkpoint
    embed_images(load_checkpoint(checkpoint), checkpoint, images, root / "emb", progress=False)
    return root / "emb", checkpoint


# -- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, peak RSS) of process ``pid`` in MB, from /proc/<pid>/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def start_server(index: Path, checkpoint: Path, port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "clipforge", "serve", "--index", str(index), "--checkpoint", str(checkpoint)]
    command += ["--port", str(port), "--device", "cpu"]
    with log.open("w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()}")
        try:
            if request(port, "/api/info")[0] == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not answer within 120 s:\n{log.read_text()}")


def request(port: int, path: str) -> tuple[int, float]:
    """(status, seconds) of one GET on a fresh connection."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        connection.close()


def status_of(port: int, path: str) -> str:
    try:
        return str(request(port, path)[0])
    except OSError as error:
        return f"error ({type(error).__name__})"


# -- the phases ----------------------------------------------------------------------------------------------
class Report:
    """Status codes per phase and the server's memory after each, printed as it goes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.totals: collections.Counter[str] = collections.Counter()
        self.baseline_mb = 0.0
        self.after_mb: dict[str, float] = {}
        print(f"{'phase':<14} {'seconds':>7} {'RSS MB':>8} {'peak MB':>8}  status codes")

    def phase(self, name: str, started: float, codes: collections.Counter[str], note: str = "") -> None:
        rss, peak = memory_mb(self.pid)
        self.after_mb[name] = rss
        self.totals.update(codes)
        shown = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())) or "-"
        print(f"{name:<14} {time.monotonic() - started:7.1f} {rss:8.0f} {peak:8.0f}  {shown}{note}")


def burst(port: int, paths: list[str], concurrency: int) -> collections.Counter[str]:
    with ThreadPoolExecutor(concurrency) as pool:
        return collections.Counter(pool.map(lambda path: status_of(port, path), paths))


def slow_clients(port: int, count: int, seconds: float, normal: list[str]) -> tuple[collections.Counter[str], str]:
    """``count`` sockets that send a partial request and a byte a second; normal requests meanwhile."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S)
        sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow")
        sock.setblocking(False)
        sockets.append(sock)
    opened, dropped_after, codes = time.monotonic(), {}, collections.Counter()
    next_normal = 0
    while time.monotonic() - opened < seconds and len(dropped_after) < count:
        for number, sock in enumerate(sockets):
            if number in dropped_after:
                continue
            try:
                if sock.recv(4096) == b"":
                    dropped_after[number] = time.monotonic() - opened
                    continue
            except BlockingIOError:
                pass
            except OSError:
                dropped_after[number] = time.monotonic() - opened
                continue
            try:
                sock.send(b"x")
            except OSError:
                dropped_after[number] = time.monotonic() - opened
        codes[status_of(port, normal[next_normal % len(normal)])] += 1  # the page, while they hang on
        next_normal += 1
        time.sleep(1.0)
    for sock in sockets:
        sock.close()
    times = sorted(dropped_after.values())
    early = [t for t in times if t < 2.0]  # replaced by newer ones while the server was full
    late = times[len(early) :]
    note = f"; slow clients dropped: {len(times)} of {count}: {len(early)} within 2 s" + (
        f", {len(late)} after {late[0]:.1f}-{late[-1]:.1f} s" if late else ""
    )
    codes["slow dropped"] += len(times)
    codes["slow kept"] += count - len(times)
    return codes, note


def rows_by_name(port: int) -> dict[str, int]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    connection.request("GET", "/api/search?q=picture&k=100")
    results = json.loads(connection.getresponse().read())["results"]
    connection.close()
    return {hit["name"]: hit["row"] for hit in results}


def run_phases(port: int, pid: int, args: argparse.Namespace) -> tuple[Report, list[str]]:
    report = Report(pid)
    rows = rows_by_name(port)
    large = [rows[name] for name in ("large_photo.jpg", "large_scan.png") if name in rows]
    small = [row for name, row in rows.items() if not name.startswith("large_")]
    query = urllib.parse.quote("a red circle")
    searches = [f"/api/search?q={query}&k=12", f"/api/similar?row={small[0]}&k=12"]

    started = time.monotonic()
    warm = [f"/image/{small[0]}", f"/api/explain?row={small[0]}&q={query}", *searches]
    report.phase("warm-up", started, burst(port, warm * 2, 1))
    report.baseline_mb = report.after_mb["warm-up"]

    started, latencies, codes = time.monotonic(), collections.defaultdict(list), collections.Counter()
    for _ in range(args.sequential):
        for row in large:
            for kind, path in (("thumbnail", f"/image/{row}"), ("explain", f"/api/explain?row={row}&q={query}")):
                status, seconds = request(port, path)
                codes[str(status)] += 1
                latencies[f"{kind} {'JPEG' if row == large[0] else 'PNG'}"].append(seconds)
    shown = ", ".join(f"{name} {statistics.median(times):.2f} s" for name, times in latencies.items())
    report.phase("large images", started, codes, f"; median latency: {shown}")

    heavy = [f"/image/{row}" for row in large] + [f"/api/explain?row={row}&q={query}" for row in large]
    mix = heavy * 2 + searches + [f"/image/{row}" for row in small[:4]]

    def bursts(name: str) -> None:
        started, codes = time.monotonic(), collections.Counter()
        for _ in range(args.rounds):
            codes.update(burst(port, mix, args.concurrency))
        report.phase(name, started, codes)

    bursts("burst")
    started = time.monotonic()
    codes, note = slow_clients(port, args.slow, args.slow_seconds, [*searches, f"/image/{small[1]}"])
    report.phase("slow clients", started, codes, note)
    bursts("burst again")
    started = time.monotonic()
    time.sleep(args.idle_seconds)
    report.phase("idle", started, collections.Counter())

    failures = []
    if report.totals.get("500"):
        failures.append(f"{report.totals['500']} answers were 500")
    errors = sum(count for code, count in report.totals.items() if code.startswith("error"))
    if errors:
        failures.append(f"{errors} normal requests got no answer")
    if report.totals.get("slow kept"):
        failures.append(f"{report.totals['slow kept']} slow clients were never dropped")
    grown = report.after_mb["idle"] - report.baseline_mb
    if grown > args.rss_bound_mb:
        failures.append(f"RSS after the bursts is {grown:.0f} MB over the baseline (bound {args.rss_bound_mb} MB)")
    return report, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="an embedding folder (default: build one with large images)")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint that embedded --index")
    parser.add_argument("--megapixels", type=float, default=36.0, help="size of the two large images")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each burst")
    parser.add_argument("--concurrency", type=int, default=12, help="requests at once in a burst")
    parser.add_argument("--sequential", type=int, default=3, help="one-at-a-time requests per large image and kind")
    parser.add_argument("--slow", type=int, default=80, help="slow clients (the server holds 64 connections)")
    parser.add_argument("--slow-seconds", type=float, default=20.0, help="the most the slow phase lasts")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--rss-bound-mb", type=float, default=150.0, help="RSS after the bursts over the baseline")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server's environment")
    parser.add_argument("--quick", action="store_true", help="12-megapixel images, 2 rounds, 20 slow clients")
    args = parser.parse_args()
    if args.quick:
        args.megapixels, args.rounds, args.sequential, args.slow, args.slow_seconds = 12.0, 2, 1, 20, 15.0
    env = dict(item.split("=", 1) for item in args.env)

    one, five, _ = os.getloadavg()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {one:.2f} (1 min), {five:.2f} (5 min)")
    with tempfile.TemporaryDirectory(prefix="server-soak-") as scratch:
        root = Path(scratch)
        if args.index is None:
            started = time.monotonic()
            args.index, args.checkpoint = build_index(root, args.megapixels)
            print(f"built a tiny model and an index with a {args.megapixels:g}-megapixel JPEG and PNG "
                  f"in {time.monotonic() - started:.0f} s")  # fmt: skip
        port = free_port()
        server = start_server(args.index, args.checkpoint, port, env, root / "server.log")
        try:
            print(f"server pid {server.pid} on 127.0.0.1:{port}" + (f", environment {env}" if env else ""))
            report, failures = run_phases(port, server.pid, args)
        finally:
            server.terminate()
            server.wait(30)
    one, five, _ = os.getloadavg()
    grown = report.after_mb["idle"] - report.baseline_mb
    totals = ", ".join(f"{code}: {count}" for code, count in sorted(report.totals.items()))
    print(f"all phases: {totals}")
    print(f"RSS: baseline {report.baseline_mb:.0f} MB, after the bursts {report.after_mb['idle']:.0f} MB "
          f"({grown:+.0f} MB; bound +{args.rss_bound_mb:.0f} MB); load average {one:.2f} (1 min) at the end")  # fmt: skip
    print("FAILED: " + "; ".join(failures) if failures else "OK: no 500, every slow client dropped, memory returned")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
