"""Speed and memory of the fine-tuning options, one training step at a time on the CPU (or a GPU with --device).

Three measurements, each of the trainer's own pieces (``build_model``, ``build_optimizer``, ``build_loss``):

* ``lora``: full fine-tuning of a text tower against LoRA (rank 8 on its attention and MLP layers), the demo's
  all-MiniLM-L6-v2 (22.7M parameters; a built-in transformer of its size when the package is missing), batches of
  clip art captions against fixed image features (a locked, cached image tower, as ``finetune-demo``): step time
  (forward, backward, AdamW), trainable parameters, AdamW state, and the peak tensor memory the step creates
  (``clipforge.train.memory.TensorMemoryTracker``: gradients, saved activations, temporaries; exact, not RSS);
* ``patch-dropout``: a built-in ViT (224 px, patch 16: 196 patches; width 384, 6 blocks) with
  ``model.image.patch_dropout`` 0, 0.5 and 0.75: forward + backward of the image tower and head;
* ``buckets``: the text tower's forward + backward over one batch padded to its longest caption, against the same
  captions cut into 4 buckets of similar length, each padded to its own longest (what length-bucketed text batches
  would save; the contrastive batch would be the same).

Each figure is the median of ``--repeats`` timed steps after a warm-up step.

    python benchmarks/finetune_speed.py                       # every measurement
    python benchmarks/finetune_speed.py --only lora --json speed.json
    python benchmarks/finetune_speed.py --quick               # small sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from _machine import cpu_model

from clipforge.config import LossConfig, OptimConfig, config_from_dict
from clipforge.data.corpus import CorpusSource
from clipforge.data.tokenize import build_tokenizer
from clipforge.losses import build_loss
from clipforge.model.factory import build_model
from clipforge.packaged import packaged_available
from clipforge.train.memory import TensorMemoryTracker
from clipforge.train.optim import build_optimizer

MINILM = "package:all-minilm-l6-v2"


def timed(step, repeats: int, device: torch.device) -> float:
    """The median seconds of ``repeats`` calls of ``step`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def text_model(rank: int, quick: bool):
    """(model, tokenizer): the demo's text side (MiniLM, mean pooled, identity-initialised head) trainable,
    with LoRA of ``rank`` (0: full fine-tuning); the image side is a locked stand-in whose features are given."""
    text = {"kind": "hf", "name": MINILM, "pooling": "mean", "context_length": 32, "tokenizer": {"kind": "hf"}}
    if quick or not packaged_available("all-minilm-l6-v2"):
        width, depth = (64, 2) if quick else (384, 6)
        text = {"kind": "transformer", "width": width, "depth": depth, "heads": 4, "context_length": 32}
    if rank:
        text["lora"] = {"rank": rank, "alpha": 2.0 * rank, "targets": ["attention", "mlp"]}
    image = {"kind": "vit", "image_size": 32, "patch_size": 16, "width": 32, "depth": 1, "heads": 1, "lock": True}
    config = config_from_dict({"model": {"embed_dim": 384 if not quick else 64, "image": image, "text": text}})
    captions = [caption for index in range(len(clipart())) for caption in clipart().captions(index)]
    tokenizer = build_tokenizer(config.model.text.tokenizer, config.model.text.name, captions)
    torch.manual_seed(0)
    return build_model(config, tokenizer), tokenizer, config


_CLIPART: list = []


def clipart() -> CorpusSource:
    if not _CLIPART:
        _CLIPART.append(CorpusSource("clipart", "train"))
    return _CLIPART[0]


def caption_batch(size: int) -> list[str]:
    source = clipart()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randperm(len(source), generator=generator)[:size].tolist()
    return [source.captions(row)[0] for row in rows]


def contrastive_step(model, optimizer, input_ids, attention_mask, image_features):
    """One optimizer step of the text side against fixed image features (a locked, cached image tower)."""
    loss_fn = build_loss(LossConfig())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model(None, input_ids, attention_mask, image_tower_features=image_features)
        loss_fn(output.image_embeds, output.text_embeds, output.logit_scale).backward()
        optimizer.step()

    return step


def backward_of(model, forward):
    """Forward + backward of ``forward(model)`` summed (the gradients a step would need), no optimizer."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        forward(model).sum().backward()

    return step


def measure_lora(args, device: torch.device) -> list[dict]:
    rows = []
    captions = caption_batch(args.batch)
    for rank in (0, 8):
        model, tokenizer, config = text_model(rank, args.quick)
        model = model.to(device).train()
        input_ids, attention_mask = (t.to(device) for t in tokenizer(captions, 32))
        image_features = torch.randn(len(captions), model.image_tower.output_dim, device=device)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-4), device, config.model)
        step = contrastive_step(model, optimizer, input_ids, attention_mask, image_features)
        seconds = timed(step, args.repeats, device)
        with TensorMemoryTracker() as tracker:
            step()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tower_trainable = sum(p.numel() for p in model.text_tower.parameters() if p.requires_grad)
        state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        rows.append(
            {
                "method": "LoRA r=8" if rank else "full fine-tune",
                "tower": model.text_tower.describe(),
                "step_s": seconds,
                "trainable": trainable,
                "tower_trainable": tower_trainable,
                "adamw_state_mib": state / 2**20,
                "step_peak_mib": tracker.peak / 2**20,
            }
        )
    return rows


def measure_patch_dropout(args, device: torch.device) -> list[dict]:
    size, patch, width, depth, batch = (64, 16, 64, 2, 4) if args.quick else (224, 16, 384, 6, args.image_batch)
    rows = []
    images = torch.randn(batch, 3, size, size, device=device)
    for rate in (0.0, 0.5, 0.75):
        image = {"kind": "vit", "image_size": size, "patch_size": patch, "width": width, "depth": depth,
                 "heads": width // 64, "patch_dropout": rate}  # fmt: skip
        text = {"kind": "transformer", "width": 32, "depth": 1, "heads": 1, "lock": True}
        config = config_from_dict({"model": {"embed_dim": 64, "image": image, "text": text}})
        torch.manual_seed(0)
        tokenizer = build_tokenizer(config.model.text.tokenizer, "", ["a b c"] * 8)
        model = build_model(config, tokenizer).to(device).train()
        step = backward_of(model, lambda m: m.encode_image(images))
        rows.append({"patch_dropout": rate, "tokens": 1 + max(1, round((1 - rate) * (size // patch) ** 2)),
                     "step_s": timed(step, args.repeats, device)})  # fmt: skip
    return rows


def measure_buckets(args, device: torch.device) -> list[dict]:
    model, tokenizer, _ = text_model(0, args.quick)
    model = model.to(device).train()
    captions = caption_batch(args.batch)
    whole = [tuple(t.to(device) for t in tokenizer(captions, 32))]
    ordered = sorted(captions, key=lambda caption: len(tokenizer([caption], 32)[1][0].nonzero()))
    quarter = len(ordered) // 4
    buckets = [
        tuple(t.to(device) for t in tokenizer(ordered[i : i + quarter], 32)) for i in range(0, len(ordered), quarter)
    ]
    rows = []
    for name, parts in (("one batch, padded to its longest", whole), ("4 length buckets", buckets)):
        step = backward_of(model, lambda m, parts=parts: torch.cat([m.encode_text(ids, mask) for ids, mask in parts]))
        real = sum(int(mask.sum()) for _, mask in parts)
        padded = sum(mask.numel() for _, mask in parts)
        rows.append(
            {"batches": name, "tokens": padded, "real_tokens": real, "step_s": timed(step, args.repeats, device)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["lora", "patch-dropout", "buckets"], default=None)
    parser.add_argument("--batch", type=int, default=256, help="captions per text step")
    parser.add_argument("--image-batch", type=int, default=16, help="images per ViT step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the script runs")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.batch, args.repeats = 32, 1
    device = torch.device(args.device)
    where = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"finetune_speed on {where}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    results = {}
    measures = {"lora": measure_lora, "patch-dropout": measure_patch_dropout, "buckets": measure_buckets}
    for name, measure in measures.items():
        if args.only and name not in args.only:
            continue
        results[name] = measure(args, device)
        print(f"\n{name}")
        for row in results[name]:
            print("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps({"device": where, "results": copy.deepcopy(results)}, indent=2))


if __name__ == "__main__":
    main()
