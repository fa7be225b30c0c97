"""``clipforge <command>``: parse the command line, then call one library function per command."""

from __future__ import annotations

import argparse
import logging
import sys

from clipforge.config import ConfigError, DataConfig


def _train(args: argparse.Namespace) -> None:
    from clipforge.config import load_config
    from clipforge.train.loop import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"trained {result.step} steps; checkpoint: {result.checkpoint}")


def _demo(args: argparse.Namespace) -> None:
    from clipforge.demo import run_demo

    run_demo(
        output_dir=args.output, overrides=args.overrides, eval_split=args.eval_split, from_scratch=args.from_scratch
    )


def _eval(args: argparse.Namespace) -> None:
    from clipforge.eval.command import run_eval

    run_eval(
        args.checkpoint,
        args.task,
        args.data,
        templates=args.templates,
        classnames=args.classnames,
        out=args.out,
        plot=args.plot,
        batch_size=args.batch_size,
        device=args.device,
    )


def _data_config(items: list[str]) -> DataConfig:
    """A data SRC/SPEC: one shard spec (``shards/{00000..00009}.tar``), or what ``eval --data`` takes."""
    from clipforge.config import data_config_from_dict
    from clipforge.eval.command import parse_data_spec

    if len(items) == 1 and "=" not in items[0] and ".tar" in items[0]:
        return data_config_from_dict({"kind": "webdataset", "path": items[0]})
    return parse_data_spec(items)


def _data_pack(args: argparse.Namespace) -> None:
    from clipforge.data.pack import pack_source

    result = pack_source(_data_config(args.source), args.out_dir, args.shard_size, args.max_side)
    print(f"packed {result.written} images into {len(result.shards)} shards ({result.skipped} unreadable left out)")
    print(f"read them with: data.kind=webdataset data.path={result.spec}")


def _data_inspect(args: argparse.Namespace) -> None:
    from clipforge.data.pack import inspect_source

    print(inspect_source(_data_config(args.source), args.grid, args.grid_images, args.limit).format())


def _embed(args: argparse.Namespace) -> None:
    from clipforge.search.command import run_embed

    run_embed(
        args.checkpoint, args.out, args.images, args.texts, args.dtype, args.batch_size, args.workers, args.device
    )


def _search(args: argparse.Namespace) -> None:
    from clipforge.search.command import run_search

    run_search(
        args.index, args.checkpoint, args.query, args.image, args.top, args.grid, args.kind, args.backend, args.device
    )


def _index_build(args: argparse.Namespace) -> None:
    from clipforge.search.command import run_index_build

    run_index_build(args.index, args.kind, args.ann, args.nlist, args.hnsw_m, args.target_recall)


def _classify(args: argparse.Namespace) -> None:
    from clipforge.classify import run_classify

    run_classify(args.checkpoint, args.labels, args.images, args.templates, args.plot, args.top, device=args.device)


def _explain(args: argparse.Namespace) -> None:
    from clipforge.explain.heatmap import run_explain

    run_explain(args.checkpoint, args.image, args.text, args.out, args.method, args.overlays, args.device)


def _serve(args: argparse.Namespace) -> None:
    from clipforge.search.command import run_serve

    run_serve(args.index, args.checkpoint, args.host, args.port, args.backend, args.device, args.explain_method)


def _add_use_commands(commands: argparse._SubParsersAction) -> None:
    """embed, search, index build, classify, explain, serve: using a trained checkpoint."""
    device_help = "auto | cpu | cuda | cuda:N"
    embed = commands.add_parser("embed", help="embed images (and/or captions) into a folder for search; resumable")
    embed.add_argument("--checkpoint", required=True, help="a run's last.pt or step_<N>.pt")
    embed.add_argument(
        "--images",
        default=None,
        help="an image folder, a manifest (.csv/.tsv/.jsonl), a data config (.yaml), or shards",
    )
    embed.add_argument("--texts", default=None, help="a text file with one caption a line")
    embed.add_argument("--out", required=True, help="the embedding folder (created, or added to)")
    embed.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="how embeddings are stored")
    embed.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    embed.add_argument("--workers", type=int, default=0, help="image decoding processes")
    embed.add_argument("--device", default="auto", help=device_help)
    embed.set_defaults(run=_embed)

    search = commands.add_parser("search", help="search an embedding folder with a text or an image")
    search.add_argument("--index", required=True, help="the folder `clipforge embed` wrote")
    search.add_argument("--checkpoint", required=True, help="the checkpoint that embedded it")
    search.add_argument("--query", default=None, help="a text query")
    search.add_argument("--image", default=None, help="an image file as the query (image-to-image)")
    search.add_argument("--top", type=int, default=10, help="results to print")
    search.add_argument("--grid", default=None, metavar="PNG", help="also draw the results here")
    search.add_argument("--kind", default="images", choices=["images", "texts"], help="search the images or captions")
    search.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"], help="auto: FAISS if built")
    search.add_argument("--device", default="auto", help=device_help)
    search.set_defaults(run=_search)

    index = commands.add_parser("index", help="build a FAISS index over an embedding folder (the faiss extra)")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="build and tune an IVF or HNSW index")
    build.add_argument("--index", required=True, help="the embedding folder")
    build.add_argument("--kind", default="images", choices=["images", "texts"])
    build.add_argument("--ann", default="ivf", choices=["ivf", "hnsw"], help="inverted lists or a graph")
    build.add_argument("--nlist", type=int, default=None, help="IVF cells; default sqrt(N)")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    build.add_argument("--target-recall", type=float, default=0.95, help="recall@10 the search knob is tuned to")
    build.set_defaults(run=_index_build)

    classify = commands.add_parser("classify", help="zero-shot probabilities of images over given labels")
    classify.add_argument("--checkpoint", required=True)
    classify.add_argument("--labels", required=True, help="comma-separated labels, e.g. 'cat,dog,car'")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    classify.add_argument(
        "--templates", default="openai-imagenet", help="prompt ensemble: a named set, one template with {}, or JSON"
    )
    classify.add_argument("--plot", default=None, metavar="PNG", help="draw the probabilities as bar charts here")
    classify.add_argument("--top", type=int, default=5, help="labels to print per image")
    classify.add_argument("--device", default="auto", help=device_help)
    classify.set_defaults(run=_classify)

    explain = commands.add_parser("explain", help="heat maps of where texts match images")
    explain.add_argument("--checkpoint", required=True)
    explain.add_argument("--image", required=True, nargs="+", help="one or more image files")
    explain.add_argument("--text", required=True, action="append", help="a text; repeat for several")
    explain.add_argument("--out", default="explain.png", help="the figure: one row per image, one map per text")
    explain.add_argument(
        "--method", default="auto", choices=["auto", "attention-gradient", "rollout", "gradcam"], help="auto: by tower"
    )
    explain.add_argument("--overlays", default=None, metavar="DIR", help="also save each overlay alone here")
    explain.add_argument("--device", default="auto", help=device_help)
    explain.set_defaults(run=_explain)

    serve = commands.add_parser("serve", help="a web page to search an embedding folder (the serve extra)")
    serve.add_argument("--index", required=True, help="the folder `clipforge embed` wrote")
    serve.add_argument("--checkpoint", required=True, help="the checkpoint that embedded it")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind; other than 127.0.0.1 exposes the page")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--backend", default="auto", choices=["auto", "exact", "faiss"])
    serve.add_argument("--explain-method", default="auto", choices=["auto", "attention-gradient", "rollout", "gradcam"])
    serve.add_argument("--device", default="auto", help=device_help)
    serve.set_defaults(run=_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config or shipped recipe")
    train.add_argument("config", help="a YAML file, or a shipped recipe name such as 'demo'")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=64 loss.kind=siglip")
    train.add_argument("--resume", default=None, help="a checkpoint path, or 'latest' for <output_dir>/last.pt")
    train.set_defaults(run=_train)

    demo = commands.add_parser(
        "demo",
        help="train heads on locked pretrained towers (LiT) on the built-in emoji set, then report held-out results",
    )
    demo.add_argument("--output", default="demo-output", help="folder for the run, its pictures and results")
    demo.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the small from-scratch model instead (no pretrained weights, no demo extra needed)",
    )
    demo.add_argument(
        "--eval-split", default="test", choices=["val", "test"], help="report on 'test'; tune recipes on 'val'"
    )
    demo.add_argument("overrides", nargs="*", help="dotted overrides of the demo recipe, e.g. train.steps=200")
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser("eval", help="zero-shot classification or retrieval of a checkpoint on local data")
    evaluate.add_argument("--checkpoint", required=True, help="a run's last.pt, best.pt or step_<N>.pt")
    evaluate.add_argument("--task", required=True, choices=["zeroshot", "retrieval"])
    evaluate.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="YAML|KEY=VALUE",
        help="a YAML file with a data section, and/or data fields, e.g. kind=manifest path=test.csv split=test",
    )
    evaluate.add_argument(
        "--templates",
        default="simple",
        help="zero-shot prompts: a named set (simple, openai-imagenet, cifar10 ...), one template with {}, "
        "or a JSON file (file.json, or file.json:dataset)",
    )
    evaluate.add_argument(
        "--classnames",
        default=None,
        help="zero-shot class names in label order (.txt, one per line, or .json); default: the dataset's own",
    )
    evaluate.add_argument("--out", default=None, help="write the results JSON (CLIP_benchmark layout) here")
    evaluate.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="draw a confusion matrix (zeroshot) or caption queries with their top-5 images (retrieval); "
        "without a file name: --out with .png",
    )
    evaluate.add_argument("--batch-size", type=int, default=256, help="images or prompts per forward pass")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    evaluate.set_defaults(run=_eval)

    data = commands.add_parser("data", help="write a source as WebDataset shards, or inspect a source")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    source_help = (
        "a YAML file with a data section and/or data fields (kind=manifest path=train.csv), "
        "or a shard spec such as shards/{00000..00009}.tar"
    )
    pack = data_commands.add_parser("pack", help="turn any source into WebDataset tar shards")
    pack.add_argument("source", nargs="+", metavar="SRC", help=source_help)
    pack.add_argument("out_dir", metavar="OUT_DIR", help="folder for the shards {00000..N}.tar (must hold no .tar)")
    pack.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    pack.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side exceeds this")
    pack.set_defaults(run=_data_pack)
    inspect = data_commands.add_parser("inspect", help="count images, captions and labels; draw a sample grid")
    inspect.add_argument("source", nargs="+", metavar="SPEC", help=source_help)
    inspect.add_argument("--grid", default=None, metavar="PNG", help="draw the first readable images here")
    inspect.add_argument("--grid-images", type=int, default=16, help="images in the grid")
    inspect.add_argument("--limit", type=int, default=None, help="look at the first N images only")
    inspect.set_defaults(run=_data_inspect)
    _add_use_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clipforge.train.checkpoint import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        args.run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError) as error:
        # input mistakes get their message, not a stack trace
        print(f"clipforge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
