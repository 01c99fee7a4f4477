"""`transformers.Trainer` and peft integration for Engram models."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..modeling.integration_engram import TrainerHooks
from .delta import apply_engram_delta, has_engram_delta, save_engram_delta
from .optim import EngramOptimizer, build_optimizer, clip_grad_norm_, engram_tables, is_engram_parameter


class EngramTrainer(TrainerHooks, Trainer):
    """A `Trainer` that builds the Engram optimizer groups and clips sparse table gradients correctly.

    Tables train with `table_optimizer` at `engram_lr * table_lr_multiplier` without weight decay, dense Engram
    parameters at `engram_lr` (default: `learning_rate`), the rest at `learning_rate` (`damp_first_step`: see
    `EngramOptimizer`); dense groups use AdamW with
    `weight_decay`, `adam_beta1/2` and `adam_epsilon` from the `TrainingArguments`.
    `max_grad_norm` clips the global norm over dense and sparse gradients. Several processes train with DDP (sparse
    table gradients are summed over ranks like dense ones, so every rank applies the same row updates); FSDP and
    DeepSpeed are refused. Checkpoints of a peft-wrapped model also
    hold the Engram delta (tables and Engram layers), restored by `resume_from_checkpoint`.

    KL replay ("learning without forgetting"), with a frozen `teacher` (e.g. the untrained model: a graft computes
    exactly its base's function): batches may mark rows of general text with a boolean `replay` `[B]`; the loss is
    then the cross-entropy of the labelled tokens plus, on replay rows, KL(teacher || model) of every next-token
    distribution, each token counted once in the mean. With `replay_tables=False` the replay rows run in a second
    forward pass whose table lookups take no gradient, so the tables cannot learn to undo the rest of the model's drift
    on the replay text's own n-grams.
    """

    def __init__(
        self,
        *args,
        table_optimizer: str = "adam",
        table_lr_multiplier: float = 5.0,
        engram_lr: float | None = None,
        sparse_tables: bool = True,
        damp_first_step: bool = True,
        teacher: nn.Module | None = None,
        replay_tables: bool = True,
        **kwargs,
    ):
        self.table_optimizer = table_optimizer
        self.engram_lr = engram_lr
        self.table_lr_multiplier = table_lr_multiplier
        self.sparse_tables = sparse_tables
        self.damp_first_step = damp_first_step
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.replay_tables = replay_tables
        super().__init__(*args, **kwargs)
        fsdp = bool(self.is_fsdp_enabled or self.args.fsdp)  # accelerate drops the plugin on CPU: ask the args too
        if fsdp or self.is_deepspeed_enabled or self.args.deepspeed:
            raise ValueError(
                f"EngramTrainer does not support {'FSDP' if fsdp else 'DeepSpeed'}: it shards "
                "parameters and optimizer state into flat buffers, while Engram tables train with sparse row gradients "
                "and row-wise optimizer state. Train on several processes with DDP instead (`torchrun "
                "--nproc_per_node N train.py` or `accelerate launch` with distributed_type MULTI_GPU / MULTI_CPU)."
            )
        if self.optimizer is not None and not isinstance(self.optimizer, EngramOptimizer) and sparse_tables:
            raise ValueError(
                f"optimizers=({type(self.optimizer).__name__}, ...) cannot update sparse Engram table gradients; leave "
                "`optimizers` unset (EngramTrainer builds them), pass `engram_hf.build_optimizer(...)`, or "
                "`sparse_tables=False`."
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model if model is None else model,
                lr=self.args.learning_rate,
                table_optimizer=self.table_optimizer,
                table_lr_multiplier=self.table_lr_multiplier,
                engram_lr=self.engram_lr,
                weight_decay=self.args.weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                sparse_tables=self.sparse_tables,
                damp_first_step=self.damp_first_step,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or "replay" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        replay, labels = inputs.pop("replay"), inputs.pop("labels")  # [B], [B, T]
        parts = [(torch.ones_like(replay), True)] if self.replay_tables else [(~replay, True), (replay, False)]
        total, count, outputs = 0.0, 0, None
        for rows, tables_learn in parts:
            if not rows.any():
                continue
            with contextlib.nullcontext() if tables_learn else frozen(engram_tables(model)):
                part = model(**{key: value[rows] for key, value in inputs.items()})
            outputs = part if outputs is None else outputs  # returned: the first part's (fact rows if split)
            logits = part.logits[:, :-1].float()  # [b, T-1, V]: position t predicts token t+1
            targets = labels[rows][:, 1:]
            total = total + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            count = count + (targets != -100).sum()
            kept = replay[rows]
            if kept.any():
                mask = inputs["attention_mask"][rows][kept]
                with torch.no_grad():
                    teacher = self.teacher(input_ids=inputs["input_ids"][rows][kept], attention_mask=mask)
                reference = teacher.logits[:, :-1].float().log_softmax(-1)  # [R, T-1, V]
                student = logits[kept].log_softmax(-1)
                kl = F.kl_div(student, reference, reduction="none", log_target=True).sum(-1)  # [R, T-1]
                real = mask[:, 1:].bool()  # the next token is text, not padding
                total = total + kl[real].sum()
                count = count + real.sum()
        loss = total / count.clamp_min(1)
        return (loss, outputs) if return_outputs else loss

    def engram_clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """The training step's clipping: the global norm over dense and sparse gradients."""
        self.accelerator.unscale_gradients()  # fp16 loss scaling: clip the true gradients
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def engram_grad_norm(self, model: nn.Module, grad_norm: torch.Tensor | None = None) -> float:
        """The logged gradient norm (sparse gradients included)."""
        if grad_norm is None:
            grad_norm = clip_grad_norm_(model.parameters(), float("inf"))
        return float(grad_norm)

    def engram_after_save(self, output_dir: str) -> None:
        """A peft model's checkpoint also holds the Engram delta."""
        if _is_peft(self.model) and self.args.should_save:
            save_engram_delta(self.model, output_dir)

    def engram_after_load(self, checkpoint: str, model: nn.Module) -> None:
        """Resuming a peft model restores its Engram delta."""
        if _is_peft(model) and has_engram_delta(checkpoint):
            apply_engram_delta(model, checkpoint)


@contextlib.contextmanager
def frozen(modules: list[nn.Module]):
    """Parameters of `modules` take no gradient inside the block (their flags are restored after)."""
    flags = [p.requires_grad for m in modules for p in m.parameters()]
    for module in modules:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip((p for m in modules for p in m.parameters()), flags):
            param.requires_grad_(flag)


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _train_engram_parameters(peft_model: nn.Module, train_engram: str) -> nn.Module:
    """Unfreeze the Engram parameters that peft froze (LoRA adapters on Engram linears stay as peft set them)."""
    for name, param in peft_model.named_parameters():
        if "lora_" not in name and is_engram_parameter(name):
            param.requires_grad_(is_engram_parameter(name, train_engram))
    return peft_model


def engram_lora(model: nn.Module, lora_config, train_engram: str = "all") -> nn.Module:
    """Wrap an Engram model with peft LoRA, keeping its Engram parameters trainable next to the adapters.

    `train_engram="tables"` keeps only the tables trainable (W_K, W_V, norms and conv frozen, as `set_trainable`).
    """
    from peft import get_peft_model

    return _train_engram_parameters(get_peft_model(model, lora_config), train_engram)


def save_lora_engram(peft_model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Save a LoRA + Engram model: the peft adapter plus the Engram delta, in one folder."""
    peft_model.save_pretrained(save_directory)
    save_engram_delta(peft_model, save_directory)


def load_lora_engram(
    model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False, train_engram: str = "all"
) -> nn.Module:
    """Load what `save_lora_engram` wrote onto the converted Engram base `model`; returns the `PeftModel`.

    With `is_trainable`, the adapters and the Engram parameters of `train_engram` (as in `engram_lora`) train on.
    """
    from peft import PeftModel

    apply_engram_delta(model, directory)
    peft_model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
    return _train_engram_parameters(peft_model, train_engram) if is_trainable else peft_model
