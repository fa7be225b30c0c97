"""``clipforge import SPEC --out CKPT``: released CLIP / SigLIP weights as an ordinary clipforge checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import add_input, add_output
from clipforge.config.choices import WEIGHTS_SPEC_HELP


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import",
        help="convert a Hugging Face model (CLIP, SigLIP, SigLIP 2, ...) or an open_clip model into a clipforge checkpoint",
    )
    add_input(parser, "spec", kind="path", help=f"what to import: {WEIGHTS_SPEC_HELP}")
    add_output(parser, "--out", required=True, help="the checkpoint to write, e.g. clip-vit-b-32.pt")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from clipforge.interop.load import from_pretrained, save_imported_checkpoint

    out = Path(args.out)  # checked by the command line before the import, which can take a while
    loaded = from_pretrained(args.spec)
    save_imported_checkpoint(loaded, out, args.spec)
    towers = [
        f"{side} {tower.describe()} ({sum(p.numel() for p in tower.parameters()) / 1e6:.1f}M parameters)"
        for side, tower in (("image", loaded.model.image_tower), ("text", loaded.model.text_tower))
    ]
    print(
        f"imported {args.spec}: {', '.join(towers)}, embed_dim {loaded.config.model.embed_dim}, loss "
        f"{loaded.config.loss.kind}; wrote {out} (use it as --checkpoint, or as model.init to fine-tune)"
    )
