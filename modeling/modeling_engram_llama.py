"""EngramLlama: Llama decoder with Engram conditional memory at `config.engram_layer_ids`."""

from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
)

from .configuration_engram import EngramLlamaConfig
from .modeling_engram import EngramDecoderLayerMixin, EngramForCausalLMMixin, EngramModelMixin, EngramPreTrainedMixin


class EngramLlamaDecoderLayer(EngramDecoderLayerMixin, LlamaDecoderLayer):
    pass


class EngramLlamaPreTrainedModel(EngramPreTrainedMixin, LlamaPreTrainedModel):
    config_class = EngramLlamaConfig
    config: EngramLlamaConfig
    engram_auto_classes = {"AutoModel": "EngramLlamaModel", "AutoModelForCausalLM": "EngramLlamaForCausalLM"}


class EngramLlamaModel(EngramModelMixin, EngramLlamaPreTrainedModel, LlamaModel):
    decoder_layer_class = EngramLlamaDecoderLayer


class EngramLlamaForCausalLM(EngramForCausalLMMixin, EngramLlamaPreTrainedModel, LlamaForCausalLM):
    model_class = EngramLlamaModel
    causal_lm_base = LlamaForCausalLM


__all__ = ["EngramLlamaPreTrainedModel", "EngramLlamaModel", "EngramLlamaForCausalLM"]
