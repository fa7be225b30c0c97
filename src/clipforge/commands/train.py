"""``clipforge train CONFIG [overrides] [--resume PATH|latest] [--overwrite]``."""

from __future__ import annotations

import argparse

from clipforge.config import load_config


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train a model from a YAML config or shipped recipe")
    # not a protected input: continuing a run from its own config.yaml (written by clipforge) rewrites that file;
    # a config.yaml of the user's in train.output_dir is protected by the run folder's rules (train.run_dir)
    parser.add_argument("config", help="a YAML file, or a shipped recipe name such as 'demo'")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 loss.kind=siglip")
    parser.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <output_dir>/last.pt")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a train.output_dir that holds a run: its last.pt, step_*.pt, best.pt, metrics.jsonl "
        "and TensorBoard event files are removed first",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from clipforge.train.loop import train

    result = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if result.is_main:  # under torchrun every process returns here; one summary is enough
        print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")
