"""Peak tensor memory of one training step against the contrastive batch size, on the CPU with a tiny model.

Methods (all through `clipforge.train.gradcache.backward_step`, the trainer's own step):

- `plain`: the whole batch through both towers in one graph, CLIP loss over the full N x N logits;
- `gradcache`: `train.accumulation_steps = N / micro` (micro-batches of `--micro`), CLIP loss unchunked;
- `gradcache+chunk`: GradCache and `loss.chunk_size = --chunk` (no N x N matrix anywhere);
- `siglip-chunked`: the whole batch through the towers, SigLIP loss summed in row chunks of `--chunk`;
- `gradcache+siglip-chunked`: both.

Measurement: `clipforge.train.memory.TensorMemoryTracker`, a TorchDispatchMode that adds every tensor storage
created during the step when an operator returns it and subtracts it when it is freed, and keeps the peak.
On the CPU neither torch nor the OS gives a clean figure (resident memory mixes allocator caching and the
Python heap); the tracker counts tensor bytes exactly and the same way on every machine. The step runs once
before it is measured, so the parameters' gradients already exist and are accumulated in place: the peak is
activations, saved tensors, logits and temporaries, i.e. what grows with the batch.

    python benchmarks/memory.py                       # 256 .. 8192, budget 256 MiB
    python benchmarks/memory.py --sizes 256 1024 --budget-mib 64 --extend 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from clipforge.config import LossConfig, ModelConfig, config_from_dict
from clipforge.data.samples import Batch
from clipforge.losses import build_loss
from clipforge.model import create_model
from clipforge.train.gradcache import backward_step
from clipforge.train.memory import TensorMemoryTracker

VOCAB = 300
CONTEXT = 16
METHODS = {
    # name: (loss kind, GradCache?, chunked loss?)
    "plain": ("clip", False, False),
    "gradcache": ("clip", True, False),
    "gradcache+chunk": ("clip", True, True),
    "siglip-chunked": ("siglip", False, True),
    "gradcache+siglip-chunked": ("siglip", True, True),
}


def tiny_model_config() -> ModelConfig:
    """The tests' tiny model: ViT 32 px / patch 8 (17 tokens), 2 blocks of width 48; text 16 tokens, 2 blocks."""
    return config_from_dict(
        {
            "model": {
                "embed_dim": 32,
                "image": {"kind": "vit", "image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "heads": 2},
                "text": {"kind": "transformer", "width": 48, "depth": 2, "heads": 2, "context_length": CONTEXT},
            }
        }
    ).model


def random_batch(size: int, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, CONTEXT + 1, (size,), generator=generator)
    mask = (torch.arange(CONTEXT) < lengths[:, None]).long()
    input_ids = torch.randint(1, VOCAB, (size, CONTEXT), generator=generator) * mask
    return Batch(torch.randn(size, 3, 32, 32, generator=generator), input_ids, mask)


def measure(method: str, batch_size: int, micro: int, chunk: int) -> dict:
    loss_kind, gradcache, chunked = METHODS[method]
    torch.manual_seed(0)
    model = create_model(tiny_model_config(), loss_kind=loss_kind, vocab_size=VOCAB).train()
    loss_fn = build_loss(LossConfig(kind=loss_kind, chunk_size=chunk if chunked else None))
    steps = max(1, batch_size // micro) if gradcache else 1
    batch = random_batch(batch_size)
    step = lambda: backward_step(model, loss_fn, batch, steps, contextlib.nullcontext(), None)  # noqa: E731
    step()  # gradients exist from here on: the measured step accumulates into them in place
    started = time.perf_counter()
    with TensorMemoryTracker() as tracker:
        step()
    return {
        "method": method,
        "batch": batch_size,
        "peak_mib": tracker.peak / 2**20,
        "step_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--micro", type=int, default=256, help="GradCache micro-batch")
    parser.add_argument("--chunk", type=int, default=256, help="loss.chunk_size of the chunked methods")
    parser.add_argument("--budget-mib", type=float, default=256.0, help="report the largest batch under this")
    parser.add_argument("--extend", type=int, default=32768, help="keep doubling past --sizes up to this batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    print(f"{'method':>26} {'batch':>6} {'peak MiB':>9} {'step s':>7}")
    for method in args.methods:
        sizes = list(args.sizes)
        while sizes:
            row = measure(method, sizes.pop(0), args.micro, args.chunk)
            rows.append(row)
            print(f"{row['method']:>26} {row['batch']:>6} {row['peak_mib']:>9.1f} {row['step_s']:>7.2f}", flush=True)
            if not sizes and row["peak_mib"] <= args.budget_mib and row["batch"] * 2 <= args.extend:
                sizes.append(row["batch"] * 2)  # still under the budget: find where it stops fitting
    print(f"\nlargest batch measured under {args.budget_mib:g} MiB:")
    for method in args.methods:
        fitting = [r["batch"] for r in rows if r["method"] == method and r["peak_mib"] <= args.budget_mib]
        largest = max(r["batch"] for r in rows if r["method"] == method)
        verdict = max(fitting) if fitting else f"< {min(args.sizes)}"
        note = " (the largest tried)" if fitting and max(fitting) == largest else ""
        print(f"{method:>26}: {verdict}{note}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
