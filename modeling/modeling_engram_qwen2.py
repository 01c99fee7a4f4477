"""EngramQwen2: Qwen2 decoder with Engram conditional memory at `config.engram_layer_ids`."""

from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
)

from .configuration_engram import EngramQwen2Config
from .modeling_engram import EngramDecoderLayerMixin, EngramForCausalLMMixin, EngramModelMixin, EngramPreTrainedMixin


class EngramQwen2DecoderLayer(EngramDecoderLayerMixin, Qwen2DecoderLayer):
    pass


class EngramQwen2PreTrainedModel(EngramPreTrainedMixin, Qwen2PreTrainedModel):
    config_class = EngramQwen2Config
    config: EngramQwen2Config
    engram_auto_classes = {"AutoModel": "EngramQwen2Model", "AutoModelForCausalLM": "EngramQwen2ForCausalLM"}


class EngramQwen2Model(EngramModelMixin, EngramQwen2PreTrainedModel, Qwen2Model):
    decoder_layer_class = EngramQwen2DecoderLayer


class EngramQwen2ForCausalLM(EngramForCausalLMMixin, EngramQwen2PreTrainedModel, Qwen2ForCausalLM):
    model_class = EngramQwen2Model
    causal_lm_base = Qwen2ForCausalLM


__all__ = ["EngramQwen2PreTrainedModel", "EngramQwen2Model", "EngramQwen2ForCausalLM"]
