"""``clipforge export onnx`` / ``hf`` / ``open_clip``: a checkpoint as ONNX graphs, a Hugging Face folder or an
open_clip model folder, each checked against PyTorch."""

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
    export = commands.add_parser("export", help="write a checkpoint in another format (ONNX, Hugging Face, open_clip)")
    formats = export.add_subparsers(dest="export_format", required=True)
    onnx = formats.add_parser("onnx", help="image_encoder.onnx + text_encoder.onnx (dynamic batch), checked")
    add_input(onnx, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(onnx)
    add_output(onnx, "--out", kind="folder", required=True, help="the folder to write (new, or without an export)")
    onnx.add_argument("--atol", type=float, default=1e-4, help="largest onnxruntime-vs-PyTorch difference accepted")
    onnx.set_defaults(run=run_onnx)
    hf = formats.add_parser(
        "hf", help="a Hugging Face model folder (CLIP, SigLIP, SigLIP 2, ...; + tokenizer, image processor), checked"
    )
    add_input(hf, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(hf)
    add_output(hf, "--out", kind="folder", required=True, help="the folder to write (new or empty)")
    hf.add_argument("--atol", type=float, default=1e-4, help="largest transformers-vs-clipforge difference accepted")
    hf.set_defaults(run=run_hf)
    open_clip = formats.add_parser(
        "open_clip",
        help="an open_clip model folder (open_clip_config.json, open_clip_model.safetensors, tokenizer), checked: "
        "open_clip.create_model_and_transforms('local-dir:OUT')",
    )
    add_input(open_clip, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(open_clip)
    add_output(open_clip, "--out", kind="folder", required=True, help="the folder to write (new or empty)")
    open_clip.add_argument(
        "--atol", type=float, default=1e-4, help="largest open_clip-vs-clipforge difference accepted"
    )
    open_clip.set_defaults(run=run_open_clip)


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
    print(
        f"wrote {result.folder} (config.json, model.safetensors, tokenizer, preprocessor_config.json): "
        f"transformers' {result.model_class} matches clipforge within {result.max_difference:.1e}"
    )


def run_open_clip(args: argparse.Namespace) -> None:
    from clipforge.interop.open_clip.export import export_open_clip

    loaded = load_model(args.checkpoint, "cpu", args.weights)
    with user_errors("export open_clip"):
        result = export_open_clip(loaded, args.out, atol=args.atol)
    print(
        f"wrote {result.folder} (open_clip_config.json, open_clip_model.safetensors, tokenizer): "
        f"open_clip.create_model_and_transforms('local-dir:{result.folder}') matches clipforge within "
        f"{result.max_difference:.1e}"
    )
