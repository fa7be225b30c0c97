"""Training throughput of the trainer's step on one CUDA GPU: samples/s, peak memory, MFU; with/without compile.

Model: ViT-B/32 at 224 px (the built-in ViT: patch 32, width 768, 12 blocks, 12 heads) and a 12-layer text
transformer (width 512, 8 heads, 77 tokens, vocabulary 49408), embed 512, CLIP loss; bf16 autocast with
float32 master weights and fused AdamW, as `clipforge train` runs them. Settings:

- `plain-256`: contrastive batch 256 in one graph;
- `gradcache-16384`: contrastive batch 16384 as 64 GradCache micro-batches of 256 (`train.accumulation_steps`),
  with `loss.chunk_size = 1024` so the 16384 x 16384 logits are never held.

Each runs with and without `train.compile` (`torch.compile` of both towers). One step = zero_grad +
`backward_step` + grad clipping + `optimizer.step()`, on a synthetic batch already on the GPU (no data
loading: this measures the model step alone). Timed over `--steps` steps after `--warmup` (compilation happens
in the warm-up), with `torch.cuda.synchronize()` around the timed region.

- samples/s: contrastive pairs per second;
- peak memory: `torch.cuda.max_memory_allocated()` over the timed steps;
- MFU: model FLOPs per pair (forward + backward of both towers, counted once by `FlopCounterMode` on a plain
  micro-batch; GradCache's extra forward is *not* model FLOPs) x samples/s / the GPU's dense bf16 peak
  (`--peak-tflops`, else looked up from the device name).

    python benchmarks/gpu_throughput.py                    # on a CUDA machine
    python benchmarks/gpu_throughput.py --settings plain-256 --no-compile-variant
    python benchmarks/gpu_throughput.py --smoke            # a tiny model on the CPU: checks the script runs

Not run yet on a GPU (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clipforge.config import LossConfig, OptimConfig, config_from_dict
from clipforge.data.samples import Batch
from clipforge.distributed.wrap import compile_towers
from clipforge.losses import build_loss
from clipforge.model import create_model
from clipforge.model.registry import MAX_LOG_LOGIT_SCALE
from clipforge.runtime import autocast_context
from clipforge.train.gradcache import backward_step
from clipforge.train.optim import build_optimizer

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets
BF16_PEAK_TFLOPS = {"H200": 989.5, "H100 SXM": 989.5, "H100 80GB HBM3": 989.5, "H100 PCIe": 756.5, "A100": 312.0}
SETTINGS = {"plain-256": (256, 256, None), "gradcache-16384": (16384, 256, 1024)}  # batch, micro, loss chunk


def model_sections(smoke: bool) -> dict:
    if smoke:
        image = {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2}
        text = {"kind": "transformer", "width": 48, "depth": 2, "heads": 2, "context_length": 16}
        return {"embed_dim": 32, "image": image, "text": text}
    image = {"kind": "vit", "image_size": 224, "patch_size": 32, "width": 768, "depth": 12, "heads": 12}
    text = {"kind": "transformer", "width": 512, "depth": 12, "heads": 8, "context_length": 77}
    return {"embed_dim": 512, "image": image, "text": text}


def synthetic_batch(size: int, image_size: int, context: int, vocab: int, device: torch.device) -> Batch:
    generator = torch.Generator(device=device).manual_seed(0)
    lengths = torch.randint(8, context + 1, (size,), generator=generator, device=device)
    mask = (torch.arange(context, device=device) < lengths[:, None]).long()
    input_ids = torch.randint(1, vocab, (size, context), generator=generator, device=device) * mask
    images = torch.randn(size, 3, image_size, image_size, generator=generator, device=device)
    return Batch(images, input_ids, mask)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def flops_per_sample(model, batch: Batch, loss_fn, autocast) -> float:
    """Forward + backward FLOPs of one plain step per pair (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        backward_step(model, loss_fn, batch, 1, autocast, None)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def run_setting(name: str, compiled: bool, args: argparse.Namespace, device: torch.device) -> dict:
    batch_size, micro, chunk = SETTINGS[name]
    if args.smoke:
        batch_size, micro = batch_size // 64, micro // 64
    config = config_from_dict({"model": model_sections(args.smoke)})
    vocab = 300 if args.smoke else 49408
    torch.manual_seed(0)
    model = create_model(config.model, vocab_size=vocab).to(device).train()
    optimizer = build_optimizer(model, OptimConfig(), device, config.model)
    autocast = autocast_context(device, args.precision)
    image_size, context = config.model.image.image_size, config.model.text.context_length
    batch = synthetic_batch(batch_size, image_size, context, vocab, device)
    micro_batch = Batch(batch.images[:micro], batch.input_ids[:micro], batch.attention_mask[:micro])
    flops = flops_per_sample(model, micro_batch, build_loss(LossConfig()), autocast)
    if compiled:
        compile_towers(model, **({"backend": "eager"} if args.smoke else {}))  # smoke: no inductor C++ build
    loss_fn = build_loss(LossConfig(chunk_size=chunk))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = backward_step(model, loss_fn, batch, batch_size // micro, autocast, None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.log_logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        return loss

    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize()
    elapsed = time.perf_counter() - started
    samples_per_second = batch_size * args.steps / elapsed
    peak = peak_tflops(device, args.peak_tflops)
    return {
        "setting": name,
        "compile": compiled,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch_size,
        "micro_batch": micro,
        "samples_per_second": samples_per_second,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "model_tflops_per_second": flops * samples_per_second / 1e12,
        "mfu": flops * samples_per_second / (peak * 1e12) if peak else None,
        "final_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--no-compile-variant", action="store_true", help="only the uncompiled runs")
    parser.add_argument("--smoke", action="store_true", help="tiny model and batches on the CPU (no figures)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.smoke:
        device, args.steps, args.warmup = torch.device("cpu"), 1, 1
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        parser.error("needs a CUDA GPU (use --smoke to check the script on the CPU)")

    rows = []
    for name in args.settings:
        for compiled in (False,) if args.no_compile_variant else (False, True):
            row = run_setting(name, compiled, args, device)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'setting':>16} {'compile':>7} {'samples/s':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}")
    for row in rows:
        memory = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(
            f"{row['setting']:>16} {str(row['compile']):>7} {row['samples_per_second']:>10.1f} {memory:>9} "
            f"{row['model_tflops_per_second']:>8.1f} {mfu:>6}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
