"""The two sides of ``vs_open_clip.py``: one architecture built by clipforge and by open_clip, their training
steps as each framework's own trainer runs them, and the weight map that shows they are the same model.

Not a benchmark itself (``run_all.py`` skips files whose name starts with ``_``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from clipforge.config import config_from_dict
from clipforge.data.samples import Batch
from clipforge.losses import build_loss
from clipforge.model import MAX_LOG_LOGIT_SCALE, create_model
from clipforge.runtime import autocast_context
from clipforge.train.gradcache import backward_step
from clipforge.train.optim import build_optimizer

FRAMEWORKS = ("clipforge", "open_clip")
# normalized embeddings of the two models with the same weights must agree to this (fp32; float noise is ~1e-6)
SAME_FUNCTION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Arch:
    """One CLIP architecture: ViT image tower, causal text transformer, linear heads without bias."""

    name: str
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int

    def clipforge_model(self) -> dict:
        """The ``model`` section of a clipforge config (built-in ViT + built-in text transformer)."""
        image = {
            "kind": "vit", "image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
            "depth": self.vision_layers, "heads": self.vision_heads, "mlp_ratio": 4.0, "head": "linear",
        }  # fmt: skip
        text = {
            "kind": "transformer", "context_length": self.context_length, "width": self.text_width,
            "depth": self.text_layers, "heads": self.text_heads, "mlp_ratio": 4.0, "head": "linear", "pooling": "eot",
        }  # fmt: skip
        return {"embed_dim": self.embed_dim, "image": image, "text": text}

    def open_clip_config(self) -> dict:
        """open_clip's model config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``) for the same model.

        open_clip derives the ViT's heads from ``head_width``; GELU (not QuickGELU), learned positions, class
        token pooling, ``ln_pre``, a bias-free ``proj``; text: argmax (end-of-text) pooling, a bias-free
        ``text_projection``: open_clip's defaults, every one of them what clipforge's built-in towers do.
        """
        vision = {
            "image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
            "layers": self.vision_layers, "head_width": self.vision_width // self.vision_heads, "mlp_ratio": 4.0,
        }  # fmt: skip
        text = {
            "context_length": self.context_length, "vocab_size": self.vocab_size, "width": self.text_width,
            "heads": self.text_heads, "layers": self.text_layers, "mlp_ratio": 4.0,
        }  # fmt: skip
        return {"embed_dim": self.embed_dim, "quick_gelu": False, "vision_cfg": vision, "text_cfg": text}

    def describe(self) -> str:
        return (
            f"ViT {self.image_size} px / patch {self.patch_size}, width {self.vision_width}, {self.vision_layers} "
            f"layers, {self.vision_heads} heads; text {self.context_length} tokens, vocab {self.vocab_size}, width "
            f"{self.text_width}, {self.text_layers} layers, {self.text_heads} heads; embed {self.embed_dim}"
        )


SIZES = {
    arch.name: arch
    # name, image size, patch, ViT width, layers, heads; context, vocab, text width, layers, heads; embed
    for arch in (
        Arch("smoke", 32, 8, 64, 2, 2, 16, 1000, 64, 2, 2, 32),
        Arch("tiny", 64, 8, 256, 6, 4, 32, 49408, 256, 4, 4, 256),
        Arch("B-32", 224, 32, 768, 12, 12, 77, 49408, 512, 12, 8, 512),
        Arch("B-16", 224, 16, 768, 12, 12, 77, 49408, 512, 12, 8, 512),
    )
}


@dataclass
class Inputs:
    """One synthetic batch both frameworks see: images (B, 3, S, S) float32; input_ids (B, L) long with the
    end-of-text token (the highest id, vocab_size - 1) last and zeros after it; attention_mask (B, L), 1 on
    the real tokens through the end-of-text."""

    images: Tensor
    input_ids: Tensor
    attention_mask: Tensor

    def head(self, count: int) -> Inputs:
        return Inputs(self.images[:count], self.input_ids[:count], self.attention_mask[:count])

    def batch(self) -> Batch:
        return Batch(self.images, self.input_ids, self.attention_mask)


def synthetic_inputs(arch: Arch, batch: int, device: torch.device, seed: int = 0) -> Inputs:
    """Seeded on the CPU and then moved, so every device gets the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    context = arch.context_length
    lengths = torch.randint(2, context + 1, (batch,), generator=generator)  # real tokens, end-of-text included
    mask = (torch.arange(context) < lengths[:, None]).long()
    # ids below the end-of-text id, so open_clip's argmax pooling and clipforge's mask pooling pick the same token
    input_ids = torch.randint(1, arch.vocab_size - 1, (batch, context), generator=generator) * mask
    input_ids[torch.arange(batch), lengths - 1] = arch.vocab_size - 1
    images = torch.randn(batch, 3, arch.image_size, arch.image_size, generator=generator)
    return Inputs(images.to(device), input_ids.to(device), mask.to(device))


@dataclass
class Side:
    """One framework's model and optimizer on the shared inputs, as calls the benchmark times."""

    name: str
    model: nn.Module
    train_step: Callable[[], Tensor]  # one optimizer step on the whole batch; returns the loss (no sync)
    forward_backward: Callable[[Inputs], Tensor]  # forward + loss + backward (for the FLOP count)
    embed_images: Callable[[], Tensor]  # normalized image embeddings of the batch, inference mode
    embed_texts: Callable[[], Tensor]
    encode: Callable[[Inputs], tuple[Tensor, Tensor]]  # fp32 normalized (image, text) embeddings


def clipforge_side(arch: Arch, config, precision: str, inputs: Inputs, device: torch.device) -> Side:
    """clipforge's model and its trainer's step: zero_grad, ``backward_step`` (forward under autocast, loss
    in float32, backward), clip_grad_norm_, AdamW (``build_optimizer``), the logit-scale clamp."""
    torch.manual_seed(0)
    model = create_model(config.model, config.loss.kind, vocab_size=arch.vocab_size).to(device).train()
    optimizer = build_optimizer(model, config.optim, device, config.model)
    loss_fn = build_loss(config.loss)
    autocast = autocast_context(device, precision)
    batch = inputs.batch()

    def forward_backward(part: Inputs) -> Tensor:
        return backward_step(model, loss_fn, part.batch(), 1, autocast, None)

    def train_step() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = backward_step(model, loss_fn, batch, 1, autocast, None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        with torch.no_grad():
            model.log_logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        return loss

    def embed_images() -> Tensor:
        with torch.inference_mode(), autocast:
            return model.encode_image(inputs.images)

    def embed_texts() -> Tensor:
        with torch.inference_mode(), autocast:
            return model.encode_text(inputs.input_ids, inputs.attention_mask)

    def encode(part: Inputs) -> tuple[Tensor, Tensor]:
        return model.encode_image(part.images), model.encode_text(part.input_ids, part.attention_mask)

    return Side("clipforge", model, train_step, forward_backward, embed_images, embed_texts, encode)


_REGISTERED: set[str] = set()


def create_open_clip_model(arch: Arch, loss: str, device: torch.device) -> nn.Module:
    """``open_clip.create_model`` of ``arch`` registered as a custom model config JSON; random weights."""
    import open_clip

    name = f"clipforge-bench-{arch.name}"
    if name not in _REGISTERED:
        with tempfile.TemporaryDirectory() as folder:  # open_clip reads the file when it is added
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(arch.open_clip_config()))
            open_clip.add_model_config(path)
        _REGISTERED.add(name)
    # open_clip's SigLIP configs start at t = 10, b = -10, as clipforge does
    extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0} if loss == "siglip" else {}
    logging.disable(logging.WARNING)  # "No pretrained weights loaded": random init is what is wanted
    try:
        return open_clip.create_model(name, pretrained=None, precision="fp32", device=device, output_dict=True, **extra)
    finally:
        logging.disable(logging.NOTSET)


def open_clip_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    """AdamW as ``open_clip_train/main.py`` builds it: no decay for 1-d tensors, norms ("ln"/"bn" in the name),
    biases and logit_scale, decay for the rest (so, unlike clipforge, also the embeddings); torch's default
    implementation choice (foreach on CUDA, the per-tensor loop on the CPU)."""

    def exclude(name: str, parameter: Tensor) -> bool:
        return parameter.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in named if exclude(name, p)], "weight_decay": 0.0},
        {"params": [p for name, p in named if not exclude(name, p)], "weight_decay": config.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)


def open_clip_side(arch: Arch, config, precision: str, inputs: Inputs, device: torch.device) -> Side:
    """open_clip's model and the step of ``open_clip_train/train.py``: zero_grad, autocast over model + loss,
    backward, clip_grad_norm_, AdamW step, logit_scale clamped to [0, log 100]."""
    from open_clip.loss import ClipLoss, SigLipLoss

    model = create_open_clip_model(arch, config.loss.kind, device).train()
    optimizer = open_clip_optimizer(model, config.optim)
    loss_fn = ClipLoss(cache_labels=True) if config.loss.kind == "clip" else SigLipLoss()
    bf16 = precision == "bf16"  # open_clip's amp_bf16; fp32 runs without autocast
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def forward_backward(part: Inputs) -> Tensor:
        with autocast():
            output = model(part.images, part.input_ids)
            total = sum(loss_fn(**output, output_dict=True).values())
        total.backward()
        return total.detach()

    def train_step() -> Tensor:
        optimizer.zero_grad()
        loss = forward_backward(inputs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    def embed_images() -> Tensor:
        with torch.inference_mode(), autocast():
            return model.encode_image(inputs.images, normalize=True)

    def embed_texts() -> Tensor:
        with torch.inference_mode(), autocast():
            return model.encode_text(inputs.input_ids, normalize=True)

    def encode(part: Inputs) -> tuple[Tensor, Tensor]:
        return model.encode_image(part.images, normalize=True), model.encode_text(part.input_ids, normalize=True)

    return Side("open_clip", model, train_step, forward_backward, embed_images, embed_texts, encode)


def build_sides(
    arch: Arch, loss: str, precision: str, inputs: Inputs, device: torch.device, only: str | None = None
) -> list[Side]:
    """[clipforge, open_clip] (or the one ``only`` names) with the same hyper-parameters: clipforge's defaults."""
    config = config_from_dict({"model": arch.clipforge_model(), "loss": {"kind": loss}})
    builders = {"clipforge": clipforge_side, "open_clip": open_clip_side}
    return [builders[name](arch, config, precision, inputs, device) for name in FRAMEWORKS if only in (None, name)]


# ----------------------------------------------------------------------------------------------
# Same model: parameter counts, the weight map, the same embeddings
# ----------------------------------------------------------------------------------------------
def _part_counts(model: nn.Module, part_of: Callable[[str], str]) -> dict[str, int]:
    counts = {"image": 0, "text": 0, "logit": 0}
    for name, parameter in model.named_parameters():
        counts[part_of(name)] += parameter.numel()
    return {**counts, "all": sum(counts.values())}


def _clipforge_part(name: str) -> str:
    return "logit" if name in ("log_logit_scale", "logit_bias") else "image" if name.startswith("image_") else "text"


def _open_clip_part(name: str) -> str:
    return "logit" if name.startswith("logit_") else "image" if name.startswith("visual.") else "text"


def count_parts(sides: list[Side]) -> dict[str, dict[str, int]]:
    """Parameters per part (image tower + head, text tower + head, logit scale/bias) of both; equal or an error."""
    counts = {
        side.name: _part_counts(side.model, _clipforge_part if side.name == "clipforge" else _open_clip_part)
        for side in sides
    }
    if counts["clipforge"] != counts["open_clip"]:
        raise SystemExit(f"the two models differ in size: {counts}; the configs in SIZES do not describe one model")
    return counts


# clipforge name -> open_clip name; the heads are stored transposed (open_clip: x @ proj, clipforge: Linear)
_HEADS = {"image_head.proj.weight": "visual.proj", "text_head.proj.weight": "text_projection"}
# open_clip's model calls its log t parameter logit_scale too (its losses take the multiplier under that name)
_TOP_LEVEL = {"log_logit_scale": "logit_scale", "logit_bias": "logit_bias"}
_TOWER_PREFIXES = (
    ("image_tower.patch_embed.", "visual.conv1."),
    ("image_tower.transformer.blocks.", "visual.transformer.resblocks."),
    ("image_tower.", "visual."),
    ("text_tower.transformer.blocks.", "transformer.resblocks."),
    ("text_tower.", ""),
)
_BLOCK_PARTS = (
    ("ln1.", "ln_1."),
    ("ln2.", "ln_2."),
    ("attn.qkv.weight", "attn.in_proj_weight"),  # both stack [query; key; value] along the output rows
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def open_clip_name(name: str) -> tuple[str, bool]:
    """(open_clip's name for clipforge's parameter ``name``, whether it is stored transposed)."""
    if name in _HEADS:
        return _HEADS[name], True
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name], False
    for prefix, replacement in _TOWER_PREFIXES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if prefix.endswith("blocks."):
            index, _, inside = rest.partition(".")
            for old, new in _BLOCK_PARTS:
                if inside.startswith(old):
                    inside = new + inside[len(old) :]
                    break
            rest = f"{index}.{inside}"
        return replacement + rest, False
    return name, False


def copy_weights(source: nn.Module, target: nn.Module) -> str | None:
    """Copy clipforge's ``source`` weights into open_clip's ``target`` one to one; None, or what did not map."""
    targets = dict(target.named_parameters())
    problems, used = [], set()
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            other, transposed = open_clip_name(name)
            value = parameter.T if transposed else parameter
            if other not in targets or targets[other].shape != value.shape:
                problems.append(f"{name} -> {other}")
                continue
            targets[other].copy_(value)
            used.add(other)
    problems += [f"open_clip {name} unmatched" for name in targets if name not in used]
    return f"{len(problems)} tensors did not map ({', '.join(problems[:3])})" if problems else None


def check_same_function(sides: list[Side], arch: Arch, device: torch.device) -> dict:
    """Give open_clip clipforge's weights, then compare both models' fp32 embeddings of a few inputs.

    A map that does not fit (a renamed tower parameter) leaves the models independently initialised (noted,
    speed is unaffected); embeddings that differ with equal weights mean the architectures differ: an error.
    """
    clipforge, open_clip = sides
    problem = copy_weights(clipforge.model, open_clip.model)
    if problem:
        return {"shared": False, "note": f"not shared, each framework's own random init ({problem})"}
    probe = synthetic_inputs(arch, 4, device, seed=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 for the comparison
    try:
        with torch.no_grad():
            for side in sides:
                side.model.eval()
            (image_a, text_a), (image_b, text_b) = clipforge.encode(probe), open_clip.encode(probe)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for side in sides:
            side.model.train()
    image_gap, text_gap = float((image_a - image_b).abs().max()), float((text_a - text_b).abs().max())
    if max(image_gap, text_gap) > SAME_FUNCTION_TOLERANCE:
        raise SystemExit(
            f"with the same weights the models give different embeddings (max |difference| image {image_gap:.2e}, "
            f"text {text_gap:.2e}): the architectures differ; fix Arch.clipforge_model / open_clip_config"
        )
    tensors = sum(1 for _ in clipforge.model.parameters())
    return {
        "shared": True,
        "max_embedding_difference": {"image": image_gap, "text": text_gap},
        "note": (
            f"clipforge's initial weights copied into open_clip ({tensors} tensors, one to one, shapes checked); "
            f"fp32 embeddings agree to {image_gap:.1e} (image), {text_gap:.1e} (text)"
        ),
    }


def arch_record(arch: Arch) -> dict:
    return {**asdict(arch), "description": arch.describe(), "open_clip_config": arch.open_clip_config()}
