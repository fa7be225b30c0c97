"""clipforge against open_clip on the same architecture: training and inference speed, memory, utilization.

Both frameworks build the same two-tower model (a CLIP ViT + causal text transformer with linear heads
without bias), asserted to have equal parameter counts; clipforge's initial weights are then copied into
open_clip's model tensor by tensor (a one-to-one name map, every shape checked), and the two models must give
the same embeddings on a test batch, so the frameworks run the same function on the same numbers.

- Training: one full step per call on one seeded synthetic batch that both see (images (B, 3, S, S); token
  ids with an end-of-text token, the highest id, at varying lengths and the matching attention mask):
  clipforge through its trainer's step (``backward_step``, then gradient clipping, AdamW from
  ``build_optimizer`` and the logit-scale clamp); open_clip as its ``open_clip_train`` loop does it (autocast
  over model + ``ClipLoss``/``SigLipLoss``, backward, clipping, AdamW with main.py's two decay groups, clamp).
  Same hyper-parameters on both sides (clipforge's defaults: lr 5e-4, weight decay 0.2, betas (0.9, 0.98),
  eps 1e-6, gradient clipping at norm 1). Precision ``fp32`` or ``bf16`` autocast (open_clip's ``amp_bf16``).
- Rounds: after the warm-up, ``--rounds`` rounds per framework alternate A B A B (A = clipforge), each round
  ``--steps`` calls; samples/s per round, the per-round ratio clipforge / open_clip (> 1: clipforge is
  faster) and its median.
- Inference: image and text embeddings per second, ``torch.inference_mode()``, the same alternation.
- Peak memory of training, each framework alone in a fresh subprocess: on CUDA
  ``torch.cuda.max_memory_allocated`` (weights, gradients, optimizer state and activations); on the CPU the
  growth of peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) from after building the model, optimizer and
  batch to after the steps: gradients, optimizer state, activations and allocator caching.
- Allocator: both frameworks run in a process with glibc's heap set as every clipforge command sets it
  (``clipforge.runtime.keep_freed_memory_in_the_heap``: freed blocks are reused, not page-faulted in again);
  ``--glibc-malloc`` leaves glibc's defaults, to measure what the setting gives each framework.
- Utilization: model FLOPs per training sample (forward + backward, counted once by ``FlopCounterMode`` on a
  micro-batch) x samples/s, against the measured peak of a square matmul of the same dtype on this device,
  and on a GPU also against the data sheet's dense bf16 peak (``--peak-tflops`` or a lookup by name).

    python benchmarks/vs_open_clip.py                             # CPU: tiny, clip + siglip, fp32 + bf16
    python benchmarks/vs_open_clip.py --quick                     # the same, batch 16, 2 rounds of 1 step (no figures)
    python benchmarks/vs_open_clip.py --smoke                     # micro model, one round: checks the script
    python benchmarks/vs_open_clip.py --size B-32 B-16 --precision bf16 --batch 256   # on a CUDA GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from clipforge.runtime import keep_freed_memory_in_the_heap
from clipforge.version import __version__ as clipforge_version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import (  # noqa: E402  (sibling modules beside this script; benchmarks/ is no package)
    PeakMemory,
    cpu_bf16_report,
    cpu_model,
    datasheet_peak_tflops,
    matmul_peak_gflops,
    synchronizer,
)
from _open_clip_sides import (  # noqa: E402
    SIZES,
    Side,
    arch_record,
    build_sides,
    check_same_function,
    count_parts,
    synthetic_inputs,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOP_MICRO_BATCH = 8


def environment(argv: list[str], device: torch.device, heap_kept: bool | None = None) -> dict:
    import open_clip

    return {
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "clipforge": clipforge_version,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "load_average_before": list(os.getloadavg()),
        "freed_memory_kept_in_heap": heap_kept,
        "command": " ".join(["python", "benchmarks/vs_open_clip.py", *argv]),
    }


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def alternate(sides: list[Side], work: str, rounds: int, steps: int, samples: int, sync) -> dict:
    """A B A B ...: ``rounds`` rounds per side of ``steps`` calls of ``side.<work>``; samples/s of each round.

    ratio_r = rate(clipforge, round r) / rate(open_clip, round r): neighbouring rounds see nearly the same
    machine, so their ratio is steadier than either rate on a machine whose load drifts.
    """
    rates: dict[str, list[float]] = {side.name: [] for side in sides}
    for _ in range(rounds):
        for side in sides:
            call = getattr(side, work)
            sync()
            started = time.perf_counter()
            for _ in range(steps):
                call()
            sync()
            rates[side.name].append(samples * steps / (time.perf_counter() - started))
    first, second = (rates[side.name] for side in sides)
    ratios = [a / b for a, b in zip(first, second, strict=True)]
    return {
        "samples_per_second": rates,
        "median_samples_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
    }


def flops_per_sample(side: Side, inputs) -> float:
    """Forward + backward FLOPs per pair of one plain step on ``inputs`` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        side.forward_backward(inputs)
    side.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(inputs.images)


def memory_worker(args: argparse.Namespace, device: torch.device) -> None:
    """In a fresh process: build one framework's side alone, run ``--memory-steps`` steps, print one JSON line."""
    arch = SIZES[args.size[0]]
    inputs = synthetic_inputs(arch, args.batch, device)
    (side,) = build_sides(arch, args.loss[0], args.precision[0], inputs, device, only=args.memory_worker)
    gc.collect()
    memory = PeakMemory(device)
    memory.start()
    for _ in range(args.memory_steps):
        side.train_step()
    peak = memory.stop()
    record = {"framework": side.name, "method": memory.method, "baseline_bytes": memory.baseline}
    print(json.dumps({**record, "peak_bytes": peak, "growth_bytes": peak - memory.baseline}), flush=True)


def measure_memory(args: argparse.Namespace, size: str, loss: str, precision: str, framework: str) -> dict:
    """:func:`memory_worker` for one framework in a subprocess; its JSON line, or the error it ended with."""
    command = [
        sys.executable, __file__, "--memory-worker", framework, "--size", size, "--loss", loss,
        "--precision", precision, "--batch", str(args.batch), "--threads", str(args.threads),
        "--device", args.device, "--memory-steps", str(args.memory_steps),
        *(["--glibc-malloc"] if args.glibc_malloc else []),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.memory_timeout)
    except subprocess.TimeoutExpired:
        return {"framework": framework, "error": f"the subprocess ran past --memory-timeout {args.memory_timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"framework": framework, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------
# One (size, loss, precision) configuration
# ----------------------------------------------------------------------------------------------
def warm_up(sides: list[Side], steps: int) -> dict[str, float]:
    """``steps`` (at least one) training steps per side; each side's first loss (same weights: they must agree)."""
    first = {}
    for side in sides:
        for index in range(max(1, steps)):
            loss = side.train_step()
            if index == 0:
                first[side.name] = float(loss)
    return first


def run_configuration(
    args, size: str, loss: str, precision: str, peaks: dict, device: torch.device, with_memory: bool
) -> dict:
    arch = SIZES[size]
    sync = synchronizer(device)
    inputs = synthetic_inputs(arch, args.batch, device)
    sides = build_sides(arch, loss, precision, inputs, device)
    row: dict = {"size": size, "loss": loss, "precision": precision, "batch": args.batch, "arch": arch_record(arch)}
    row["parameters"] = count_parts(sides)
    row["weights"] = check_same_function(sides, arch, device)
    micro = inputs.head(FLOP_MICRO_BATCH)
    row["flops_per_sample"] = {side.name: flops_per_sample(side, micro) for side in sides}
    row["first_step_loss"] = warm_up(sides, args.warmup)
    row["train"] = alternate(sides, "train_step", args.rounds, args.steps, args.batch, sync)
    # the model's FLOPs: the full computation (the larger count; clipforge skips the last block's unread
    # positions, so its own count is lower): utilization in the MFU sense, the same numerator for both sides
    model_flops = max(row["flops_per_sample"].values())
    rates = row["train"]["median_samples_per_second"]
    row["train"]["model_gflop_per_second"] = {name: model_flops * rate / 1e9 for name, rate in rates.items()}
    row["train"]["utilization_vs_measured_matmul"] = {
        name: model_flops * rate / (peaks["measured_gflops"][precision] * 1e9) for name, rate in rates.items()
    }
    # what each side actually ran: its own FLOP count x its rate
    row["train"]["executed_utilization_vs_measured_matmul"] = {
        name: row["flops_per_sample"][name] * rate / (peaks["measured_gflops"][precision] * 1e9)
        for name, rate in rates.items()
    }
    if peaks.get("datasheet_bf16_tflops") and precision == "bf16":
        row["train"]["utilization_vs_datasheet"] = {
            name: model_flops * rate / (peaks["datasheet_bf16_tflops"] * 1e12) for name, rate in rates.items()
        }
    if args.inference and loss == args.loss[0]:  # the towers are the same for every loss
        for side in sides:
            side.model.eval()
            side.embed_images()  # warm-up
            side.embed_texts()
        row["inference"] = {
            "images": alternate(sides, "embed_images", args.rounds, args.steps, args.batch, sync),
            "texts": alternate(sides, "embed_texts", args.rounds, args.steps, args.batch, sync),
        }
    del sides, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if with_memory:
        row["memory"] = {name: measure_memory(args, size, loss, precision, name) for name in ("clipforge", "open_clip")}
    return row


# ----------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------
def print_header(env: dict, peaks: dict, bf16_note: str | None) -> None:
    print(
        f"clipforge {env['clipforge']} vs open_clip {env['open_clip']}; torch {env['torch']}, python {env['python']}\n"
        f"device {env['device']}; CPU {env['cpu']}, {env['cpu_cores']} cores; torch threads {env['torch_threads']}"
        + (f"; TF32 matmul {env['tf32_matmul']}" if env["tf32_matmul"] is not None else "")
    )
    print(f"load average before: {' '.join(f'{value:.2f}' for value in env['load_average_before'])}")
    if bf16_note:
        print(bf16_note)
    measured = ", ".join(f"{name} {value:.1f} GFLOP/s" for name, value in peaks["measured_gflops"].items())
    print(f"measured matmul peak ({peaks['matmul_size']}^2 x {peaks['matmul_size']}, best of 3): {measured}")
    if peaks.get("datasheet_bf16_tflops"):
        print(f"data-sheet dense bf16 peak: {peaks['datasheet_bf16_tflops']:.1f} TFLOP/s")


def print_rounds(title: str, result: dict, unit: str) -> None:
    clipforge, open_clip = result["samples_per_second"]["clipforge"], result["samples_per_second"]["open_clip"]
    print(f"  {title}: {unit} per round (A = clipforge, B = open_clip, run A B A B ...)")
    print(f"    {'round':>5} {'clipforge':>10} {'open_clip':>10} {'ratio':>7}")
    for index, (a, b, ratio) in enumerate(zip(clipforge, open_clip, result["ratios"], strict=True), 1):
        print(f"    {index:>5} {a:>10.1f} {b:>10.1f} {ratio:>6.3f}x")
    medians = result["median_samples_per_second"]
    print(
        f"    {'median':>5} {medians['clipforge']:>10.1f} {medians['open_clip']:>10.1f} "
        f"{result['median_ratio']:>6.3f}x  (median of the per-round ratios)"
    )


def print_configuration(row: dict, args: argparse.Namespace) -> None:
    counts = row["parameters"]
    print(f"\n== {row['size']} | loss {row['loss']} | {row['precision']} | batch {row['batch']}")
    print(f"  architecture: {row['arch']['description']}")
    print(
        f"  parameters: clipforge {counts['clipforge']['all']:,} = open_clip {counts['open_clip']['all']:,} "
        f"(image {counts['clipforge']['image']:,}, text {counts['clipforge']['text']:,}, "
        f"logit {counts['clipforge']['logit']})"
    )
    print(f"  weights: {row['weights']['note']}")
    losses = row["first_step_loss"]
    print(f"  first-step loss: clipforge {losses['clipforge']:.5f}, open_clip {losses['open_clip']:.5f}")
    flops = row["flops_per_sample"]
    print(
        f"  model FLOPs per sample (forward + backward, FlopCounterMode, micro-batch {FLOP_MICRO_BATCH}): "
        f"clipforge {flops['clipforge'] / 1e9:.3f} GFLOP, open_clip {flops['open_clip'] / 1e9:.3f} GFLOP"
    )
    print_rounds(
        f"training, {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up", row["train"], "samples/s"
    )
    train = row["train"]
    used = ", ".join(f"{name} {value:.1f}" for name, value in train["model_gflop_per_second"].items())
    share = ", ".join(f"{name} {value:.1%}" for name, value in train["utilization_vs_measured_matmul"].items())
    print(f"  model GFLOP/s: {used}; utilization vs the measured {row['precision']} matmul peak: {share}")
    if "utilization_vs_datasheet" in train:
        sheet = ", ".join(f"{name} {value:.1%}" for name, value in train["utilization_vs_datasheet"].items())
        print(f"  MFU vs the data-sheet bf16 peak: {sheet}")
    for name, memory in row.get("memory", {}).items():
        if "error" in memory:
            print(f"  peak memory {name}: not measured ({memory['error']})")
            continue
        print(
            f"  peak memory {name} ({memory['method']}, alone in a fresh process): {memory['peak_bytes'] / 2**20:,.0f} "
            f"MiB; {memory['growth_bytes'] / 2**20:,.0f} MiB more than before the first step (gradients, AdamW "
            f"state, activations, allocator caching)"
        )
    for what, unit in (("images", "images/s"), ("texts", "texts/s")):
        if what in row.get("inference", {}):
            print_rounds(f"inference, {what[:-1]} embeddings", row["inference"][what], unit)


def _memory_mib(row: dict, name: str, device: torch.device) -> str:
    memory = row.get("memory", {}).get(name)
    if not memory or "error" in memory:
        return "-"
    # CUDA: the whole peak (weights included); CPU: the growth over the steps (the interpreter's RSS left out)
    return f"{(memory['peak_bytes'] if device.type == 'cuda' else memory['growth_bytes']) / 2**20:.0f}"


def summary_lines(rows: list[dict], device: torch.device) -> list[str]:
    """One line per measurement: the medians, the median ratio, utilization and memory (run_all.py copies these)."""
    lines = [
        f"{'size':<6} {'loss':<7} {'prec':<5} {'measure':<16} {'clipforge':>10} {'open_clip':>10} {'ratio':>7} "
        f"{'util cf':>8} {'util oc':>8} {'MiB cf':>7} {'MiB oc':>7}"
    ]
    for row in rows:
        measures = [("train samples/s", row["train"])]
        measures += [(f"infer {what}/s", result) for what, result in row.get("inference", {}).items()]
        for label, result in measures:
            medians = result["median_samples_per_second"]
            line = (
                f"{row['size']:<6} {row['loss']:<7} {row['precision']:<5} {label:<16} "
                f"{medians['clipforge']:>10.1f} {medians['open_clip']:>10.1f} {result['median_ratio']:>6.3f}x"
            )
            if label.startswith("train"):
                share = result.get("utilization_vs_datasheet") or result["utilization_vs_measured_matmul"]
                line += f" {share['clipforge']:>8.1%} {share['open_clip']:>8.1%}"
                line += f" {_memory_mib(row, 'clipforge', device):>7} {_memory_mib(row, 'open_clip', device):>7}"
            lines.append(line)
    basis = (
        "the data-sheet bf16 peak for bf16 (else the measured matmul peak)"
        if device.type == "cuda"
        else ("the measured matmul peak of the same dtype")
    )
    memory = "peak max_memory_allocated" if device.type == "cuda" else "peak-RSS growth over the steps"
    lines.append(
        f"util: model FLOPs (the full model's count, the same for both) x samples/s / {basis}; MiB: {memory}, "
        "each framework alone in a fresh process"
    )
    return lines


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", choices=list(SIZES), default=None,
                        help="architectures (default: tiny on the CPU, B-32 and B-16 on CUDA; smoke: --smoke's)")  # fmt: skip
    parser.add_argument("--loss", nargs="+", choices=["clip", "siglip"], default=["clip", "siglip"])
    parser.add_argument("--precision", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=None, help="contrastive batch (default: 64 tiny, 256 B-*)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per framework, alternating")
    parser.add_argument("--steps", type=int, default=None, help="calls per round (default: 3 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps per framework first")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: every core)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the matmul that measures the peak")
    parser.add_argument("--memory-steps", type=int, default=2, help="training steps of each memory subprocess")
    parser.add_argument("--memory-timeout", type=float, default=900.0, help="seconds per memory subprocess")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory subprocesses")
    parser.add_argument("--no-inference", dest="inference", action="store_false", help="skip the embedding rounds")
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 rounds of 1 step: checks the run")
    parser.add_argument("--smoke", action="store_true", help="micro model, one round: checks the script (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write every result here")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="leave glibc's allocator at its defaults (by default both frameworks run with the "
                        "heap setting clipforge's commands use: clipforge.runtime.keep_freed_memory_in_the_heap)")  # fmt: skip
    parser.add_argument("--memory-worker", choices=["clipforge", "open_clip"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.json is not None and args.json.exists() and not args.force:
        parser.error(f"--json {args.json} already exists; choose another path or pass --force to replace it")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def resolve_defaults(args: argparse.Namespace) -> torch.device:
    """Fill the defaults that depend on the device and on --quick / --smoke; return the device."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available() and not args.smoke)
    device = torch.device("cuda" if cuda else "cpu")
    args.device = device.type
    if args.memory_worker is None:
        if args.smoke:
            args.size = ["smoke"]
        args.size = args.size or (["B-32", "B-16"] if cuda else ["tiny"])
    big = any(size.startswith("B-") for size in args.size)
    args.batch = args.batch or (256 if big else 8 if args.smoke else 64)
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    if args.quick:
        args.rounds, args.steps, args.warmup, args.memory_steps = 2, 1, 1, 1
        args.batch, args.matmul_size = min(args.batch, 16), min(args.matmul_size, 1024)
    if args.smoke:
        args.rounds, args.steps, args.warmup, args.memory_steps, args.matmul_size = 1, 1, 1, 1, 256
    return device


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_worker != "clipforge":
        try:
            import open_clip  # noqa: F401
        except ImportError:
            sys.exit("vs_open_clip.py needs open_clip: pip install open_clip_torch (the dev extra has it)")
    device = resolve_defaults(args)
    torch.set_num_threads(args.threads)
    # the process-wide allocator setting `clipforge train` and every clipforge command make, for both sides
    args.heap_kept = False if args.glibc_malloc else keep_freed_memory_in_the_heap()
    if device.type == "cuda":  # as open_clip_train's main.py sets it, for both frameworks
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.memory_worker:
        memory_worker(args, device)
        return
    env = environment(argv, device, args.heap_kept)
    bf16_note = None
    if device.type == "cpu" and "bf16" in args.precision:
        bf16_ok, bf16_note = cpu_bf16_report()
        if not bf16_ok:
            args.precision = [p for p in args.precision if p != "bf16"]
    peaks = {
        "matmul_size": args.matmul_size,
        "measured_gflops": {p: matmul_peak_gflops(device, DTYPES[p], args.matmul_size) for p in args.precision},
        "datasheet_bf16_tflops": datasheet_peak_tflops(device, args.peak_tflops),
    }
    print_header(env, peaks, bf16_note)
    rows = []
    for size in args.size:
        for precision in args.precision:
            for loss in args.loss:
                # --quick: memory of the first configuration only (each costs two fresh processes)
                with_memory = args.memory and not (args.quick and rows)
                rows.append(run_configuration(args, size, loss, precision, peaks, device, with_memory))
                print_configuration(rows[-1], args)
    env["load_average_after"] = list(os.getloadavg())
    summary = summary_lines(rows, device)
    print("\nsummary (medians over the rounds; ratio = clipforge / open_clip, the median of the per-round ratios)")
    print("\n".join(summary))
    print(f"load average after: {' '.join(f'{value:.2f}' for value in env['load_average_after'])}")
    if args.json is not None:
        from clipforge.io import atomic_write_json

        record = {"environment": env, "peaks": peaks, "results": rows, "summary": summary, "arguments": vars(args)}
        atomic_write_json(args.json, record, replace=True)  # a benchmark's results file is rewritten each run


if __name__ == "__main__":
    main()
