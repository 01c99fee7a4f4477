"""The Engram model families: one table used by Auto registration, conversion and the benches."""

from __future__ import annotations

from typing import NamedTuple

from .modeling.configuration_engram import EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config
from .modeling.modeling_engram_llama import EngramLlamaForCausalLM, EngramLlamaModel
from .modeling.modeling_engram_qwen2 import EngramQwen2ForCausalLM, EngramQwen2Model
from .modeling.modeling_engram_qwen3 import EngramQwen3ForCausalLM, EngramQwen3Model


class Family(NamedTuple):
    config_class: type
    model_class: type
    causal_lm_class: type


# base model_type -> its Engram classes
FAMILIES: dict[str, Family] = {
    "llama": Family(EngramLlamaConfig, EngramLlamaModel, EngramLlamaForCausalLM),
    "qwen2": Family(EngramQwen2Config, EngramQwen2Model, EngramQwen2ForCausalLM),
    "qwen3": Family(EngramQwen3Config, EngramQwen3Model, EngramQwen3ForCausalLM),
}
# base config entries that describe the base checkpoint, not the Engram model built from it
_BASE_ONLY_KEYS = (
    "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
    "quantization_config",
)


def family_of(base_config) -> Family:
    """The Engram family of a base config, or a `ValueError` naming the supported ones."""
    if base_config.model_type not in FAMILIES:
        raise ValueError(
            f"Unsupported base model family {base_config.model_type!r}; supported: {', '.join(sorted(FAMILIES))}."
        )
    return FAMILIES[base_config.model_type]


def engram_config_from_base(base_config, **engram_fields):
    """The Engram config of `base_config`'s family: the base's fields plus `engram_fields` (validated), with the
    architecture and `auto_map` of the remote code."""
    family = family_of(base_config)
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _BASE_ONLY_KEYS}
    config = family.config_class(**fields, **engram_fields)
    config.architectures = [family.causal_lm_class.__name__]
    config.auto_map = family.causal_lm_class.remote_code_auto_map()
    return config
