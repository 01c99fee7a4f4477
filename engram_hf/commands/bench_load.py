"""`engram-hf bench-load`: tables larger than RAM, loaded as memory maps: peak RSS and decode speed, as JSON."""

from __future__ import annotations

import argparse

from ..bench_load import bench_load
from .report import print_report


def run(args: argparse.Namespace) -> int:
    results = bench_load(args.base, args.table_gib, args.ratio_table_gib, args.max_shard_size, args.tokens,
                         args.ratio_rounds, args.threads, args.workdir)
    return print_report(results, args.out)


def add_parser(commands) -> None:
    parser = commands.add_parser("bench-load", help="load and generate with tables larger than RAM (JSON)")
    parser.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--table-gib", type=float, default=32.0, help="tables of the large checkpoint (float32)")
    parser.add_argument("--ratio-table-gib", type=float, default=2.0,
                        help="tables of the checkpoint whose decode speed is compared, mapped vs copied into RAM")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per timing")
    parser.add_argument("--ratio-rounds", type=int, default=5, help="interleaved timings per model for the ratio")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: every core)")
    parser.add_argument("--workdir", default=None, help="where the (deleted afterwards) checkpoints are written")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.set_defaults(run=run)
