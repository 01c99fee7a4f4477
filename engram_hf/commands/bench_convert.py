"""`engram-hf bench-convert`: peak memory and wall time of a conversion, as JSON."""

from __future__ import annotations

import argparse

from ..bench_convert import bench_convert
from .report import print_report


def run(args: argparse.Namespace) -> int:
    verify = {"no": (False,), "yes": (True,), "both": (False, True)}[args.verify]
    results = bench_convert(args.base, args.table_gib, verify, args.workdir, args.max_shard_size, args.dtype)
    return print_report(results, args.out)


def add_parser(commands) -> None:
    parser = commands.add_parser("bench-convert", help="peak memory and wall time of a conversion (JSON)")
    parser.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--table-gib", type=float, default=8.0, help="total size of the Engram tables")
    parser.add_argument("--verify", choices=["no", "yes", "both"], default="no",
                        help="measure the conversion without, with, or both without and with its reload check")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workdir", default=None, help="where the (deleted afterwards) output is written")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.set_defaults(run=run)
