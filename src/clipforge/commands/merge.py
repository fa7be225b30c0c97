"""``clipforge merge``: WiSE-FT, the weights of two models of one architecture interpolated; one point written as a
checkpoint, or a sweep of points evaluated on eval tasks (the target metric against the retained ones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.commands.common import (
    CHECKPOINT_HELP,
    DEVICE_HELP,
    add_input,
    add_output,
    add_weights_option,
    user_errors,
)
from clipforge.config import ConfigError
from clipforge.io import atomic_write_json


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="interpolate two checkpoints of one architecture (WiSE-FT): write one, or evaluate a sweep",
        description="theta = (1 - alpha) * theta_from + alpha * theta_to, tensor by tensor. One --alpha writes a "
        "checkpoint (--out); START:STOP:STEP evaluates every point on eval tasks and prints the curve.",
    )
    add_input(parser, "--from", dest="from_spec", required=True, help="alpha = 0: " + CHECKPOINT_HELP)
    add_input(parser, "--to", dest="to_spec", required=True, help="alpha = 1: usually the fine-tune of --from")
    add_weights_option(parser, "--from-weights", help="--from's weights: raw or ema (its moving average)")
    add_weights_option(parser, "--to-weights", help="--to's weights: raw or ema (its moving average)")
    parser.add_argument(
        "--alpha", required=True, help="one value in [0, 1] (0.5), or a sweep START:STOP:STEP (0:1:0.1)"
    )
    add_output(parser, "--out", default=None, help="the merged checkpoint (one --alpha)")
    add_input(
        parser,
        "--eval",
        default=None,
        help="a sweep's tasks: a YAML file with an eval: section (tasks: [...]) as a training config has; "
        "default: the eval section of --to's run",
    )
    parser.add_argument(
        "--target",
        default=None,
        help="the metric fine-tuning aims at, TASK/METRIC; default: the eval section's "
        "best_metric, else the first task's headline figure",
    )
    parser.add_argument(
        "--retained",
        nargs="+",
        default=None,
        metavar="TASK/METRIC",
        help="the skill to keep (their mean is the curve's x axis); default: the other tasks' headline figures",
    )
    add_output(parser, "--results", default=None, help="write every point's metrics here (JSON)")
    add_output(parser, "--plot", kind="picture", default=None, help="draw the curve (target against retained)")
    parser.add_argument("--batch-size", type=int, default=256, help="images or prompts per forward pass")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from clipforge.interop.load import resolve
    from clipforge.interop.merge import interpolate, parse_alphas, save_merged

    with user_errors("merge"):
        alphas = parse_alphas(args.alpha)
    is_sweep = ":" in args.alpha
    if not is_sweep and args.out is None:
        raise ConfigError("merge --alpha A writes one checkpoint: give --out C.pt (or sweep: --alpha 0:1:0.1)")
    if is_sweep and args.out is not None:
        raise ConfigError(
            "--out writes one checkpoint; a sweep evaluates many: read the curve, then merge --alpha A --out C.pt"
        )
    if not is_sweep and (args.results or args.plot or args.eval):
        raise ConfigError("--eval, --results and --plot belong to a sweep (--alpha START:STOP:STEP)")
    first = resolve(args.from_spec, args.from_weights)
    second = resolve(args.to_spec, args.to_weights)
    if not is_sweep:
        path = save_merged(interpolate(first, second, alphas[0]), args.out)
        print(f"wrote {path}: (1 - {alphas[0]:g}) * {args.from_spec} + {alphas[0]:g} * {args.to_spec}")
        return
    run_sweep(args, first, second, alphas)


def _eval_section(args: argparse.Namespace, second):
    """The sweep's tasks: ``--eval``'s file (its ``eval:`` section, or the file itself), else ``--to``'s run's."""
    from clipforge.config import config_from_dict
    from clipforge.config.parsing import read_yaml

    if args.eval is None:
        evaluation = second.config.eval
        if not evaluation.tasks:
            raise ConfigError(f"--to {args.to_spec} has no eval tasks in its config: give --eval FILE (eval: tasks)")
        return evaluation
    values = read_yaml(args.eval)
    if not isinstance(values, dict):
        raise ConfigError(f"--eval {args.eval}: expected a mapping with an eval: section (tasks: [...])")
    section = values.get("eval", values)
    try:
        return config_from_dict({"eval": section}).eval
    except ConfigError as error:
        raise ConfigError(f"--eval {args.eval}: {error}") from None


def run_sweep(args: argparse.Namespace, first, second, alphas: list[float]) -> None:
    from clipforge.runtime import resolve_device
    from clipforge.train.wise_ft import check_metric_names, format_curve, headline_metrics, sweep

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size} must be positive")
    evaluation = _eval_section(args, second)
    evaluation.batch_size = args.batch_size
    headlines = headline_metrics(evaluation)
    target = args.target or evaluation.best_metric or headlines[0]
    retained = args.retained or [name for name in headlines if name.split("/")[0] != target.split("/")[0]]
    check_metric_names(evaluation, [target], "--target")
    check_metric_names(evaluation, retained, "--retained")
    if not retained:
        raise ConfigError("a sweep compares the target with retained skill: give --retained TASK/METRIC (another task)")
    with user_errors("merge"):
        points = sweep(first, second, alphas, evaluation, resolve_device(args.device, "--device"))
    print(f"WiSE-FT: (1 - alpha) * {args.from_spec} + alpha * {args.to_spec}")
    print(format_curve(points, target, retained))
    if args.results:
        records = [{"alpha": point.alpha, "metrics": point.metrics} for point in points]
        summary = {"from": args.from_spec, "to": args.to_spec, "target": target, "retained": retained}
        print(f"wrote {atomic_write_json(Path(args.results), {**summary, 'points': records})}")
    if args.plot:
        from clipforge.viz import plot_tradeoff_curve

        label = retained[0] if len(retained) == 1 else f"mean of {len(retained)} retained metrics"
        path = plot_tradeoff_curve(
            [point.alpha for point in points],
            [point.retained(retained) for point in points],
            [point.value(target) for point in points],
            args.plot,
            retained_label=label,
            target_label=target,
        )
        print(f"wrote {path}")
