"""`engram-hf generate`: generate text with an Engram model (local folder or Hub id)."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

    from ..generation import generation_config

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


def add_parser(commands) -> None:
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
    generate.set_defaults(run=run)
