"""TRL's `SFTTrainer` for Engram models (needs `trl`)."""

from __future__ import annotations

from trl import SFTTrainer

from .trainer import EngramTrainer


class EngramSFTTrainer(EngramTrainer, SFTTrainer):
    """`trl.SFTTrainer` with `EngramTrainer`'s optimizer groups, sparse table clipping, Engram deltas of peft
    checkpoints and KL replay; takes the arguments of both (`table_optimizer=`, `engram_lr=`, ... next to `SFTConfig`).

    For LoRA + Engram pass a model wrapped by `engram_lora` rather than `peft_config` (peft alone freezes the Engram
    parameters).
    """
