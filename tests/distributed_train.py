"""Train an Engram checkpoint with `EngramTrainer` for a few steps, once per table optimizer, and save each rank's
parameters and optimizer state: run in one process, or under `torchrun --nproc_per_node N` (DDP on gloo) with the
same global batch. Used by `test_distributed.py`.

argv: checkpoint folder, output prefix, global batch size. Under torchrun it also records EngramTrainer's refusal of FSDP.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import TrainingArguments

import engram_hf
from engram_hf.training import EngramTrainer, set_trainable

folder, out, global_batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
generator = torch.Generator().manual_seed(1)
results = {"world": world}
for table_optimizer in ("rowwise_adagrad", "adam"):
    torch.manual_seed(0)
    model = engram_hf.AutoModelForCausalLM.from_pretrained(folder)
    set_trainable(model, "engram")  # sparse tables + dense Engram parameters
    ids = torch.randint(3, model.config.vocab_size, (32, 12), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(
        f"{out}.trainer", max_steps=4, per_device_train_batch_size=global_batch // world, learning_rate=1e-2,
        max_grad_norm=0.5, train_sampling_strategy="sequential", save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, ddp_backend="gloo" if world > 1 else None,
    )
    trainer = EngramTrainer(model=model, args=args, train_dataset=data, table_optimizer=table_optimizer,
                            table_lr_multiplier=10.0)
    trainer.train()
    params = dict(model.named_parameters())
    results[table_optimizer] = {
        "params": {name: p.detach().clone() for name, p in params.items() if p.requires_grad},
        "optimizer": {name: {k: v.clone() for k, v in trainer.optimizer.state[p].items() if torch.is_tensor(v)}
                      for name, p in params.items() if p in trainer.optimizer.state},
    }
if world > 1:  # FSDP (only accepted in a distributed run): refused, naming the supported path
    try:
        EngramTrainer(model=model, args=TrainingArguments(f"{out}.fsdp", fsdp=True, use_cpu=True, report_to=[]))
    except ValueError as error:
        results["fsdp_error"] = str(error)
torch.save(results, f"{out}.rank{rank}.pt")
