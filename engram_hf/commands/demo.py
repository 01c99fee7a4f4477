"""`engram-hf demo`: the main job on the embedded SmolLM2-135M-Instruct.

Compress its vocabulary and hash a sentence, graft Engram onto it, reload the result through its own remote code (as
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` does without engram-hf), generate with
`pipeline("text-generation")` and print the logit parity with the base model.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from ..bundled import bundled_smollm2_gguf
from ..generation import generation_config
from ..modeling.hashing_engram import NgramHasher
from ..tokenization.tokenization_engram import EngramTokenizer


def run(args: argparse.Namespace) -> int:
    gguf = bundled_smollm2_gguf()
    tokenizer = EngramTokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    print(f"tokenizer: SmolLM2-135M-Instruct ({gguf.name})")
    print(f"V = {len(tokenizer):,}  V' = {tokenizer.compressed_vocab_size:,}  reduction = {tokenizer.reduction:.1%}")
    hasher = NgramHasher(
        layer_ids=[1, 15],
        max_ngram_size=3,
        n_head_per_ngram=8,
        engram_vocab_size=[5 * tokenizer.compressed_vocab_size] * 2,
        compressed_vocab_size=tokenizer.compressed_vocab_size,
        pad_token_id=tokenizer.eos_token_id,
        seed=0,
        compression_map=tokenizer.compression_map,
    )
    ids = torch.tensor([tokenizer(args.text)["input_ids"]])
    print(f"text: {args.text!r}")
    print(f"token ids:      {ids[0].tolist()}")
    print(f"compressed ids: {tokenizer.compress(ids)[0].tolist()}")
    for layer_id, rows in hasher(ids).items():
        print(f"layer {layer_id} hash ids [T={rows.shape[1]}, (N-1)*K={rows.shape[2]}]:")
        for token, row in zip(tokenizer.convert_ids_to_tokens(ids[0].tolist()), rows[0].tolist()):
            print(f"  {token!r:>14} {row}")
    if args.no_graft:
        return 0

    from ..conversion.graft import graft, load_remote_code

    print(f"\ngrafting Engram onto SmolLM2 -> {args.out}")
    result = graft(gguf, args.out, overwrite=True, progress=not args.quiet)
    print(f"Engram layers {result.layer_ids}, {result.table_parameters:,} table parameters, "
          f"verify max |logit diff| vs base = {result.max_abs_diff}")
    model = load_remote_code(args.out)  # the folder's own code, as a user without engram-hf installed would load it
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=model.dtype)
    probe = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        diff = (model(**probe).logits - base(**probe).logits).abs().max().item()
    print(f"reloaded {type(model).__module__}.{type(model).__name__}: max |logit diff| vs LlamaForCausalLM = {diff}")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer.tokenizer)
    messages = [{"role": "user", "content": args.prompt}]
    config = generation_config(model, max_new_tokens=args.max_new_tokens, do_sample=False)
    text = generator(messages, generation_config=config)[0]["generated_text"][-1]["content"]
    print(f"prompt: {args.prompt!r}\ngenerated: {text!r}")
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="compress, hash, graft, reload and generate on the bundled SmolLM2")
    parser.add_argument("text", nargs="?", default="The Engram memory hashes the last few tokens.")
    parser.add_argument("--out", default="out/smollm2-engram", help="where the grafted model is written")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--no-graft", action="store_true", help="stop after compression and hashing")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(run=run)
