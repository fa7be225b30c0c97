"""``clipforge index build``: a FAISS index (IVF, IVF-PQ or HNSW) over an embedding folder, tuned to a recall target."""

from __future__ import annotations

import argparse

from clipforge.commands.common import user_errors
from clipforge.config.choices import ANN_KINDS


def register(commands: argparse._SubParsersAction) -> None:
    index = commands.add_parser("index", help="build an approximate (FAISS) index over an embedding folder")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="build and tune an IVF, IVF-PQ or HNSW index")
    build.add_argument("--index", required=True, help="the embedding folder")
    build.add_argument("--kind", default="images", choices=["images", "texts"])
    build.add_argument(
        "--ann",
        default="ivf",
        choices=list(ANN_KINDS),
        help="inverted lists of float16 vectors, of product-quantized codes (ivfpq: ~1/16 the memory, for 10M+ rows), "
        "or a graph",
    )
    # the ranges are build_faiss_index's (it checks them, for the Python API too): FAISS aborts outside them
    build.add_argument("--nlist", type=int, default=None, help="IVF cells, 1 to the rows indexed; default sqrt(N)")
    build.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node, 2 to 512")
    build.add_argument(
        "--pq-m", type=int, default=None, help="ivfpq: bytes a row, a divisor of the width; default width / 8"
    )
    build.add_argument(
        "--target-recall", type=float, default=0.95, help="recall@10 the search knob is tuned to, in (0, 1]"
    )
    build.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Build the index; a bad parameter, a damaged folder or a folder another process writes (FolderBusyError)
    is one line and exit code 2."""
    from clipforge.search.ann_build import build_faiss_index
    from clipforge.search.store import EmbeddingStore

    with user_errors("index build"):
        report = build_faiss_index(
            EmbeddingStore(args.index),
            args.kind,
            args.ann,
            args.nlist,
            args.hnsw_m,
            args.target_recall,
            pq_m=args.pq_m,
        )
    print(
        f"built {report.factory} in {report.seconds:.1f} s: {report.path}; {report.knob}={report.value} "
        f"gives recall@10 {report.recall_at_10:.3f} against exact search"
    )
