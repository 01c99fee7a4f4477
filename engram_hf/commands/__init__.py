"""The `engram-hf` commands, one module each: they parse arguments, call the library and print."""

from __future__ import annotations

import argparse

from . import bench, bench_convert, bench_load, convert, demo, generate, knowledge_bench, publish

COMMANDS = (demo, bench, bench_convert, bench_load, convert, publish, generate, knowledge_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-hf", description="DeepSeek Engram for Hugging Face transformers.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser

