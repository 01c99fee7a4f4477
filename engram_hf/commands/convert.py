"""`engram-hf convert`: graft Engram onto a Llama / Qwen2 / Qwen3 checkpoint."""

from __future__ import annotations

import argparse


def _layer_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated 0-based layer ids, got {text!r}") from error


def _table_rows(text: str):
    return int(text) if text.isdigit() else text


def run(args: argparse.Namespace) -> int:
    from ..conversion.graft import graft

    result = graft(
        args.base,
        args.output,
        layer_ids=args.layers,
        max_ngram_size=args.max_ngram_size,
        n_head_per_ngram=args.heads,
        n_embed_per_ngram=args.embed_per_ngram,
        embed_per_head=args.embed_per_head,
        table_rows=args.table_rows,
        short_conv=not args.no_short_conv,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        overwrite=args.overwrite,
        clean=args.clean,
        verify=not args.no_verify,
        base_model=args.base_model,
        revision=args.revision,
        progress=not args.quiet,
    )
    print(f"wrote {result.output_dir}")
    print(f"  family {result.family}, Engram layers {result.layer_ids}, table rows {result.table_rows}")
    print(f"  V = {result.vocab_size:,}  V' = {result.compressed_vocab_size:,}  reduction = {result.reduction:.1%}")
    print(f"  parameters: base {result.base_parameters:,} + Engram {result.engram_parameters:,} "
          f"(tables {result.table_parameters:,})")
    return 0


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert", help="graft Engram onto a Llama/Qwen2/Qwen3 checkpoint and write a Hub-ready folder",
        description="BASE is a local folder (config.json + safetensors), a .gguf file or a Hub id (org/name).",
    )
    convert.add_argument("base")
    convert.add_argument("output")
    convert.add_argument("--layers", type=_layer_ids, default=None, help="0-based layer ids, e.g. 1,15")
    convert.add_argument("--max-ngram-size", type=int, default=3)
    convert.add_argument("--heads", type=int, default=8, help="hash heads per n-gram order")
    convert.add_argument("--embed-per-ngram", type=int, default=512)
    convert.add_argument("--embed-per-head", type=int, default=None, help="instead of --embed-per-ngram")
    convert.add_argument("--table-rows", type=_table_rows, default=None,
                         help="rows per head (int), a multiple of V' ('5x'), or a table parameter budget ('2B')")
    convert.add_argument("--no-short-conv", action="store_true")
    convert.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the base's)")
    convert.add_argument("--max-shard-size", default="2GB")
    convert.add_argument("--seed", type=int, default=0)
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it is a previous engram-hf output")
    convert.add_argument("--clean", action="store_true",
                         help="remove temporary folders that killed conversions into OUTPUT left behind")
    convert.add_argument("--no-verify", action="store_true", help="skip the reload and logit-parity check")
    convert.add_argument("--base-model", default=None, help="Hub id written as base_model in the model card")
    convert.add_argument("--revision", default=None, help="revision of a Hub BASE")
    convert.add_argument("--quiet", action="store_true", help="no progress bars")
    convert.set_defaults(run=run)
