"""``clipforge export onnx`` / ``clipforge export hf``: a checkpoint as ONNX graphs or as a Hugging Face folder,
each checked against PyTorch."""

from __future__ import annotations

import argparse

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    add_input,
    add_output,
    add_weights_option,
    load_model,
    user_errors,
)


def register(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write a checkpoint in another format (ONNX, Hugging Face)")
    formats = export.add_subparsers(dest="export_format", required=True)
    onnx = formats.add_parser("onnx", help="image_encoder.onnx + text_encoder.onnx (dynamic batch), checked")
    add_input(onnx, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(onnx)
    add_output(onnx, "--out", kind="folder", required=True, help="the folder to write (new, or without an export)")
    onnx.add_argument("--atol", type=float, default=1e-4, help="largest onnxruntime-vs-PyTorch difference accepted")
    onnx.set_defaults(run=run_onnx)
    hf = formats.add_parser(
        "hf", help="a Hugging Face CLIPModel/SiglipModel folder (+ tokenizer, image processor), checked"
    )
    add_input(hf, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(hf)
    add_output(hf, "--out", kind="folder", required=True, help="the folder to write (new or empty)")
    hf.add_argument("--atol", type=float, default=1e-4, help="largest transformers-vs-clipforge difference accepted")
    hf.set_defaults(run=run_hf)


def run_onnx(args: argparse.Namespace) -> None:
    from clipforge.interop.onnx import export_onnx

    loaded = load_model(args.checkpoint, "cpu", args.weights)
    with user_errors("export onnx"):
        result = export_onnx(loaded, args.out, atol=args.atol)
    print(
        f"wrote {result.image_encoder} and {result.text_encoder} (+ preprocess.json, tokenizer/); "
        f"onnxruntime matches PyTorch within {max(result.image_max_difference, result.text_max_difference):.1e}"
    )


def run_hf(args: argparse.Namespace) -> None:
    from clipforge.interop.hf_export import export_hf

    loaded = load_model(args.checkpoint, "cpu", args.weights)
    result = export_hf(loaded, args.out, atol=args.atol)
    model_class = "CLIPModel" if result.family == "clip" else "SiglipModel"
    print(
        f"wrote {result.folder} (config.json, model.safetensors, tokenizer, preprocessor_config.json): "
        f"transformers' {model_class} matches clipforge within {result.max_difference:.1e}"
    )
