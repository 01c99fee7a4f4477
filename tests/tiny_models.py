"""Tiny random Engram models of every family, on real tokenizers (SmolLM2, Qwen2.5) and their real compression maps.

Every Engram weight is set to non-zero random values (the default graft init zeroes the value path and the conv, which
would make the Engram layers no-ops and the tests blind), and the ShortConv is on.
"""

from __future__ import annotations

import functools

import torch

import engram_hf
from engram_hf import (
    EngramLlamaConfig,
    EngramLlamaForCausalLM,
    EngramQwen2Config,
    EngramQwen2ForCausalLM,
    EngramQwen3Config,
    EngramQwen3ForCausalLM,
)
from realdata import qwen25_tokenizer, smollm2_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3")

_CLASSES = {
    "llama": (EngramLlamaConfig, EngramLlamaForCausalLM, smollm2_tokenizer),
    "qwen2": (EngramQwen2Config, EngramQwen2ForCausalLM, qwen25_tokenizer),
    "qwen3": (EngramQwen3Config, EngramQwen3ForCausalLM, qwen25_tokenizer),
}

# per family: different Engram layers (first layer, last layer, adjacent layers) and, for Qwen3, a sliding-window layer
_FAMILY_KWARGS = {
    "llama": dict(engram_layer_ids=[0, 2]),
    "qwen2": dict(engram_layer_ids=[1, 2]),
    "qwen3": dict(
        engram_layer_ids=[0, 1],
        head_dim=16,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
    ),
}

PROMPTS = (
    "The capital of France is Paris, and the capital",
    "Hello world",
    "def fibonacci(n):\n    return",
)


def tokenizer(family: str):
    return _CLASSES[family][2]()


@functools.cache
def compression(family: str) -> tuple[torch.Tensor, int]:
    """The real compression map of the family's tokenizer and V'."""
    return engram_hf.build_compression_map(tokenizer(family))


def tiny_config(family: str, **overrides):
    config_class = _CLASSES[family][0]
    tok = tokenizer(family)
    _, compressed = compression(family)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        engram_max_ngram_size=3,
        engram_n_embed_per_ngram=32,
        engram_n_head_per_ngram=4,
        engram_vocab_size=[211, 307],
        engram_kernel_size=4,
        engram_use_short_conv=True,
        engram_map_size=len(tok),
        engram_compressed_vocab_size=compressed,
    )
    kwargs.update(_FAMILY_KWARGS[family])
    kwargs.update(overrides)
    return config_class(**kwargs)


@torch.no_grad()
def randomize_engram(model, seed: int = 0) -> None:
    """Overwrite every Engram parameter with non-zero random values."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".engram." not in name:
            continue
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if "norm" in name:  # RMSNorm weights
            param.copy_(1.0 + 0.2 * noise)
        elif "table" in name:
            param.copy_(noise)
        else:  # projections [out, in] and the depthwise conv [C, 1, K]
            fan_in = param.shape[-1] if param.dim() > 1 else 1
            param.copy_(noise / fan_in**0.5)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype | None = None, **overrides):
    """A tiny random Engram causal LM in eval mode with the real compression map installed."""
    model_class = _CLASSES[family][1]
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = model_class(config)
    model.set_compression_map(compression(family)[0])
    randomize_engram(model, seed)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def encode(family: str, text: str) -> torch.Tensor:
    """`[1, T]` ids of `text` (no special tokens)."""
    return tokenizer(family)(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
