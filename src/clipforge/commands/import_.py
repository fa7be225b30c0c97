"""``clipforge import SPEC --out CKPT``: released CLIP / SigLIP weights as an ordinary clipforge checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.interop.load import SPEC_HELP, from_pretrained, save_imported_checkpoint


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import",
        help="convert a Hugging Face CLIP/SigLIP model or an open_clip ViT checkpoint into a clipforge checkpoint",
    )
    parser.add_argument("spec", help=f"what to import: {SPEC_HELP}")
    parser.add_argument("--out", required=True, help="the checkpoint to write, e.g. clip-vit-b-32.pt (must not exist)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists():  # before the import, which can take a while: nothing is read or written for a taken name
        raise FileExistsError(f"{out} exists already; clipforge import never overwrites: choose another --out")
    loaded = from_pretrained(args.spec)
    save_imported_checkpoint(loaded, out, args.spec)
    model = loaded.config.model
    print(
        f"imported {args.spec}: ViT {model.image.width}x{model.image.depth} ({model.image.image_size} px), text "
        f"{model.text.width}x{model.text.depth}, embed_dim {model.embed_dim}, loss {loaded.config.loss.kind}; "
        f"wrote {out} (use it as --checkpoint, or as model.init to fine-tune)"
    )
