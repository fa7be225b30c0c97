"""``clipforge classify``: zero-shot label probabilities of image files, printed (and drawn)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    DEVICE_HELP,
    add_input,
    add_output,
    add_weights_option,
    load_model,
    user_errors,
)
from clipforge.config.choices import DEFAULT_TEMPLATES


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("classify", help="zero-shot probabilities of images over given labels")
    add_input(parser, "--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_weights_option(parser)
    parser.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'cat,dog,car'")
    add_input(parser, "images", kind="path", nargs="+", metavar="IMAGE", help="image files or folders")
    add_input(
        parser,
        "--templates",
        kind="path",
        default=DEFAULT_TEMPLATES,
        help="prompt ensemble: a named set, one template with {}, or JSON",
    )
    add_output(
        parser, "--plot", kind="picture", default=None, metavar="PNG", help="draw the probabilities as bar charts here"
    )
    parser.add_argument("--top", type=int, default=5, help="labels to print per image")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from clipforge.classify import classify_images, parse_labels
    from clipforge.data.base import decode_image
    from clipforge.viz import plot_class_probabilities

    with user_errors("classify"):
        names = parse_labels(args.labels)
        loaded = load_model(args.checkpoint, args.device, args.weights)
        result = classify_images(loaded, args.images, names, args.templates)
    print(result.format(args.top))
    if args.plot:
        pictures = [decode_image(path) for path in result.paths]
        plot_class_probabilities(pictures, [Path(p).name for p in result.paths], names, result.probabilities, args.plot)
        print(f"bar chart: {args.plot}")
