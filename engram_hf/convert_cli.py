"""`engram-hf convert`, `engram-hf publish` and `engram-hf generate`."""

from __future__ import annotations

import argparse


def _layer_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated 0-based layer ids, got {text!r}") from error


def _table_rows(text: str):
    return int(text) if text.isdigit() else text


def run_convert(args: argparse.Namespace) -> int:
    from .conversion.graft import graft

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


def run_publish(args: argparse.Namespace) -> int:
    from .conversion.publish import publish

    result = publish(
        args.folder, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
        dry_run=args.dry_run, token=args.token, allow_extra=args.allow_extra,
    )
    if args.dry_run:
        print(f"dry run: would upload {len(result)} files from {args.folder} to {args.repo_id}"
              f"{' (revision ' + args.revision + ')' if args.revision else ''}{' as a pull request' if args.create_pr else ''}:")
        for name in result:
            print(f"  {name}")
    else:
        print(f"uploaded {args.folder} to {getattr(result, 'commit_url', None) or args.repo_id}")
        if getattr(result, "pr_url", None):
            print(f"pull request: {result.pr_url}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

    from .generation import generation_config

    local = Path(args.model).is_dir()
    if not local and not args.trust_remote_code:
        raise ValueError(f"{args.model} is not a local folder: its model code comes from the Hub; read it, then pass "
                         "--trust-remote-code to run it.")
    trust = {"trust_remote_code": True, "revision": args.revision}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **trust)
    kwargs = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    if args.device_map:
        kwargs["device_map"] = args.device_map
    model = AutoModelForCausalLM.from_pretrained(args.model, **trust, **kwargs)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        options["temperature"] = args.temperature
    if args.seed is not None:
        torch.manual_seed(args.seed)
    chat = tokenizer.chat_template is not None and not args.raw
    prompt = [{"role": "user", "content": args.prompt}] if chat else args.prompt
    if not chat and not args.new_only:
        print(args.prompt, end="", flush=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # the answer, as it is generated
    generator(prompt, generation_config=generation_config(model, **options), streamer=streamer)
    return 0


def add_parsers(commands) -> None:
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
    convert.set_defaults(run=run_convert)

    publish = commands.add_parser("publish", help="validate a converted folder and upload it to the Hub")
    publish.add_argument("folder")
    publish.add_argument("--repo-id", required=True)
    publish.add_argument("--private", action="store_true")
    publish.add_argument("--revision", default=None)
    publish.add_argument("--create-pr", action="store_true")
    publish.add_argument("--dry-run", action="store_true", help="validate and list the files, upload nothing")
    publish.add_argument("--token", default=None)
    publish.add_argument("--allow-extra", action="store_true",
                         help="also upload pickle-format files and executable files that are not the remote code")
    publish.set_defaults(run=run_publish)

    generate = commands.add_parser("generate", help="generate text with an Engram model (local folder or Hub id)")
    generate.add_argument("model")
    generate.add_argument("prompt")
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--do-sample", action="store_true")
    generate.add_argument("--temperature", type=float, default=0.7)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--dtype", default=None)
    generate.add_argument("--device-map", default=None, help="e.g. auto (Engram tables stay in host memory)")
    generate.add_argument("--revision", default=None)
    generate.add_argument("--new-only", action="store_true", help="with --raw: print only the continuation")
    generate.add_argument("--raw", action="store_true", help="continue the prompt as text, without the chat template")
    generate.add_argument("--trust-remote-code", action="store_true",
                          help="run the model code of a Hub repository (local folders are trusted)")
    generate.set_defaults(run=run_generate)
