"""``clipforge data pack`` (any source -> WebDataset shards) and ``clipforge data inspect`` (counts, a grid)."""

from __future__ import annotations

import argparse

from clipforge.commands.common import add_input, add_output
from clipforge.commands.data_spec import parse_data_spec
from clipforge.config import ConfigError, DataConfig, data_config_from_dict

SOURCE_HELP = (
    "a YAML file with a data section and/or data fields (kind=manifest path=train.csv), "
    "or a shard spec such as shards/{00000..00009}.tar"
)


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="write a source as WebDataset shards, or inspect a source")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    pack = data_commands.add_parser("pack", help="turn any source into WebDataset tar shards")
    add_input(pack, "source", kind="data", nargs="+", metavar="SRC", help=SOURCE_HELP)
    add_output(
        pack,
        "out_dir",
        kind="folder",
        metavar="OUT_DIR",
        help="folder for the shards {00000..N}.tar (holding no .tar, unless --overwrite replaces them)",
    )
    pack.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    pack.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this")
    pack.set_defaults(run=run_pack)
    inspect = data_commands.add_parser("inspect", help="count images, captions and labels; draw a sample grid")
    add_input(inspect, "source", kind="data", nargs="+", metavar="SPEC", help=SOURCE_HELP)
    add_output(
        inspect, "--grid", kind="picture", default=None, metavar="PNG", help="draw the first readable images here"
    )
    inspect.add_argument("--grid-images", type=int, default=16, help="images in the grid")
    inspect.add_argument("--limit", type=int, default=None, help="look at the first N images only")
    inspect.set_defaults(run=run_inspect)


def source_config(items: list[str]) -> DataConfig:
    """A data SRC/SPEC: one shard spec (``shards/{00000..00009}.tar``), or what ``eval --data`` takes."""
    if len(items) == 1 and "=" not in items[0] and ".tar" in items[0]:
        return data_config_from_dict({"kind": "webdataset", "path": items[0]})
    return parse_data_spec(items)


def _require_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag}={value} must be a positive number")


def run_pack(args: argparse.Namespace) -> None:
    from clipforge.data.pack import pack_source

    _require_positive("--shard-size", args.shard_size)
    _require_positive("--max-side", args.max_side)
    result = pack_source(
        source_config(args.source), args.out_dir, args.shard_size, args.max_side, overwrite=args.overwrite
    )
    print(f"packed {result.written} images into {len(result.shards)} shards ({result.skipped} unreadable left out)")
    print(f"read them with: data.kind=webdataset data.path={result.spec}")


def run_inspect(args: argparse.Namespace) -> None:
    from clipforge.data.pack import inspect_source

    _require_positive("--grid-images", args.grid_images)
    _require_positive("--limit", args.limit)
    print(inspect_source(source_config(args.source), args.grid, args.grid_images, args.limit).format())
