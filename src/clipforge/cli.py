"""``clipforge <command>``: parse the command line, then call one library function per command."""

from __future__ import annotations

import argparse
import logging
import sys

from clipforge.config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from clipforge.config import load_config
    from clipforge.train.loop import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")


def _demo(args: argparse.Namespace) -> None:
    from clipforge.demo import run_demo

    run_demo(output_dir=args.output, overrides=args.overrides, eval_split=args.eval_split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config or shipped recipe")
    train.add_argument("config", help="a YAML file, or a shipped recipe name such as 'demo'")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 loss.kind=siglip")
    train.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <output_dir>/last.pt")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="train on the built-in emoji set, then report held-out results")
    demo.add_argument("--output", default="demo-output", help="folder for the run, its pictures and results")
    demo.add_argument(
        "--eval-split", default="test", choices=["val", "test"], help="report on 'test'; tune recipes on 'val'"
    )
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. train.steps=200")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clipforge.train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        # input mistakes get their message, not a stack trace
        print(f"clipforge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
