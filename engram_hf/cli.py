"""The `engram-hf` command line."""

from __future__ import annotations

import argparse
import sys

from . import bench, bench_convert, convert_cli, demo, knowledge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-hf", description="DeepSeek Engram for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(commands)
    bench.add_parser(commands)
    bench_convert.add_parser(commands)
    convert_cli.add_parsers(commands)
    knowledge.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"engram-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
