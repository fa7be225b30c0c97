"""``clipforge export onnx``: a checkpoint's towers as ONNX graphs, checked against PyTorch."""

from __future__ import annotations

import argparse

from clipforge.commands.common import CHECKPOINT_HELP, load_model, user_errors
from clipforge.interop.onnx import export_onnx


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write a checkpoint in another format (ONNX)")
    formats = export.add_subparsers(dest="export_format", required=True)
    onnx = formats.add_parser("onnx", help="image_encoder.onnx + text_encoder.onnx (dynamic batch), checked")
    onnx.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    onnx.add_argument("--out", required=True, help="the folder to write (must not hold an export already)")
    onnx.add_argument("--atol", type=float, default=1e-4, help="largest onnxruntime-vs-PyTorch difference accepted")
    onnx.set_defaults(run=run_onnx)


def run_onnx(args: argparse.Namespace) -> None:
    loaded = load_model(args.checkpoint, "cpu")
    with user_errors("export onnx"):
        result = export_onnx(loaded, args.out, atol=args.atol)
    print(
        f"wrote {result.image_encoder} and {result.text_encoder} (+ preprocess.json, tokenizer/); "
        f"onnxruntime matches PyTorch within {max(result.image_max_difference, result.text_max_difference):.1e}"
    )
