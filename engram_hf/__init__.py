"""engram-hf: DeepSeek Engram conditional memory as Hugging Face transformers models.

Importing this package registers the Engram configs and models with the Auto classes, so in-process loading needs no
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .families import FAMILIES, engram_config_from_base
from .modeling.configuration_engram import EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config
from .modeling.hashing_engram import NgramHasher
from .modeling.modeling_engram_llama import EngramLlamaForCausalLM, EngramLlamaModel
from .modeling.modeling_engram_qwen2 import EngramQwen2ForCausalLM, EngramQwen2Model
from .modeling.modeling_engram_qwen3 import EngramQwen3ForCausalLM, EngramQwen3Model
from .tokenization.tokenization_engram import EngramTokenizer, build_compression_map
from .conversion.graft import GraftResult, graft

for _family in FAMILIES.values():
    AutoConfig.register(_family.config_class.model_type, _family.config_class, exist_ok=True)
    AutoModel.register(_family.config_class, _family.model_class, exist_ok=True)
    AutoModelForCausalLM.register(_family.config_class, _family.causal_lm_class, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "EngramLlamaConfig",
    "EngramLlamaForCausalLM",
    "EngramLlamaModel",
    "EngramQwen2Config",
    "EngramQwen2ForCausalLM",
    "EngramQwen2Model",
    "EngramQwen3Config",
    "EngramQwen3ForCausalLM",
    "EngramQwen3Model",
    "EngramTokenizer",
    "GraftResult",
    "NgramHasher",
    "build_compression_map",
    "engram_config_from_base",
    "graft",
]
