"""EngramQwen3: Qwen3 decoder with Engram conditional memory at `config.engram_layer_ids`."""

from transformers.models.qwen3.modeling_qwen3 import (
    Qwen3DecoderLayer,
    Qwen3ForCausalLM,
    Qwen3Model,
    Qwen3PreTrainedModel,
)

from .configuration_engram import EngramQwen3Config
from .modeling_engram import EngramDecoderLayerMixin, EngramForCausalLMMixin, EngramModelMixin, EngramPreTrainedMixin


class EngramQwen3DecoderLayer(EngramDecoderLayerMixin, Qwen3DecoderLayer):
    pass


class EngramQwen3PreTrainedModel(EngramPreTrainedMixin, Qwen3PreTrainedModel):
    config_class = EngramQwen3Config
    config: EngramQwen3Config
    engram_auto_classes = {"AutoModel": "EngramQwen3Model", "AutoModelForCausalLM": "EngramQwen3ForCausalLM"}


class EngramQwen3Model(EngramModelMixin, EngramQwen3PreTrainedModel, Qwen3Model):
    decoder_layer_class = EngramQwen3DecoderLayer


class EngramQwen3ForCausalLM(EngramForCausalLMMixin, EngramQwen3PreTrainedModel, Qwen3ForCausalLM):
    model_class = EngramQwen3Model
    causal_lm_base = Qwen3ForCausalLM


__all__ = ["EngramQwen3PreTrainedModel", "EngramQwen3Model", "EngramQwen3ForCausalLM"]
