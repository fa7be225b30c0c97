"""``clipforge import SPEC --out CKPT``: released CLIP / SigLIP weights as an ordinary clipforge checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import add_input, add_output
from clipforge.config.choices import WEIGHTS_SPEC_HELP


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import",
        help="convert a Hugging Face CLIP/SigLIP model or an open_clip model into a clipforge checkpoint",
    )
    add_input(parser, "spec", kind="path", help=f"what to import: {WEIGHTS_SPEC_HELP}")
    add_output(parser, "--out", required=True, help="the checkpoint to write, e.g. clip-vit-b-32.pt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from clipforge.interop.load import from_pretrained, save_imported_checkpoint

    out = Path(args.out)  # checked by the command line before the import, which can take a while
    loaded = from_pretrained(args.spec)
    save_imported_checkpoint(loaded, out, args.spec)
    model = loaded.config.model
    image = (
        f"ViT {model.image.width}x{model.image.depth}"
        if model.image.kind == "vit"
        else loaded.model.image_tower.describe()
    )
    text = (
        f"text {model.text.width}x{model.text.depth}"
        if model.text.kind == "transformer"
        else f"text {loaded.model.text_tower.describe()}"
    )
    print(
        f"imported {args.spec}: {image} ({loaded.processor.image_size} px), {text}, embed_dim {model.embed_dim}, "
        f"loss {loaded.config.loss.kind}; wrote {out} (use it as --checkpoint, or as model.init to fine-tune)"
    )
