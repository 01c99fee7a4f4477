"""Empty memory: the fine-tuning start point at which rows that training never touches add exactly nothing."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.layer_engram import EngramLayer


def engram_layers(model: nn.Module) -> list[EngramLayer]:
    """The Engram layers of `model` (works through peft wrappers)."""
    return [module for module in model.modules() if isinstance(module, EngramLayer)]


@torch.no_grad()
def empty_memory_(model: nn.Module, value_std: float | None = None, seed: int | None = None) -> nn.Module:
    """Re-initialise the Engram memory of `model` for fine-tuning: tables zero, W_V ~ N(0, value_std); returns `model`.

    The graft (design §4) zeroes W_V and keeps random tables, so once W_V learns, every n-gram the training never saw
    still reads a random row and adds `W_V e` to the residual stream: noise on all other text. Swapping which factor
    is zero keeps the model exactly its base function (`e = 0` gives `W_V e = 0`, the ShortConv of zeros is zero),
    and since a table's gradient reaches only the rows of the batch, untouched rows stay zero for good. `value_std`
    defaults to the config's `initializer_range`; `seed` makes W_V reproducible. Erases what the tables hold.
    """
    layers = engram_layers(model)
    if not layers:
        raise ValueError("The model has no Engram layers.")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    std = value_std if value_std is not None else _initializer_range(model)
    for engram in layers:
        value_proj = getattr(engram.value_proj, "base_layer", engram.value_proj)  # a LoRA-wrapped W_V
        weight = torch.randn(value_proj.weight.shape, generator=generator, dtype=torch.float32) * std
        value_proj.weight.copy_(weight)
        if value_proj.bias is not None:
            value_proj.bias.zero_()
        engram.table.weight.zero_()
    return model


def _initializer_range(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    return float(getattr(config, "initializer_range", 0.02) or 0.02)
