"""Fine-tuning Engram models: optimizer groups, sparse table optimizers and clipping, Trainer and peft, deltas."""

from .delta import apply_engram_delta, engram_state_dict, save_engram_delta
from .memory import empty_memory_, engram_layers
from .optim import (
    EngramOptimizer,
    build_optimizer,
    clip_grad_norm_,
    optimizer_state_bytes,
    set_sparse_tables,
    set_trainable,
)
from .trainer import EngramTrainer, engram_lora, load_lora_engram, save_lora_engram

__all__ = [
    "EngramOptimizer",
    "EngramTrainer",
    "apply_engram_delta",
    "build_optimizer",
    "clip_grad_norm_",
    "empty_memory_",
    "engram_layers",
    "engram_lora",
    "engram_state_dict",
    "load_lora_engram",
    "optimizer_state_bytes",
    "save_engram_delta",
    "save_lora_engram",
    "set_sparse_tables",
    "set_trainable",
]


def __getattr__(name: str):
    if name == "EngramSFTTrainer":  # imports trl, an optional dependency, only when asked for
        from .sft import EngramSFTTrainer

        return EngramSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
