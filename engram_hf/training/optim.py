"""Optimizers for Engram models: parameter groups, lazy sparse Adam and row-wise Adagrad for tables, sparse clipping.

Engram tables are huge and each step touches few rows. With `sparse_tables=True` their gradients are sparse row
gradients (`nn.Embedding(sparse=True)`), which dense optimizers and `torch.nn.utils.clip_grad_norm_` reject. The paper
trains tables with Adam at 5x the backbone learning rate and no weight decay; `EngramOptimizer` does that with lazy
updates (only the rows of this step move), or with row-wise Adagrad, whose state is one float per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain

import torch
from torch import nn

TABLE_METHODS = ("adam", "rowwise_adagrad", "adamw")  # "adamw": dense state, needs dense table gradients
_SPARSE_METHODS = ("adam", "rowwise_adagrad")


def engram_tables(model: nn.Module) -> list[nn.Embedding]:
    """The Engram table modules of `model` (works through peft wrappers)."""
    return [module for name, module in model.named_modules() if name.endswith("engram.table")]


def set_sparse_tables(model: nn.Module, sparse: bool = True) -> None:
    """Make Engram tables produce sparse row gradients (`sparse=True`) or dense ones."""
    for table in engram_tables(model):
        table.sparse = sparse


def is_engram_parameter(name: str, train_engram: str = "all") -> bool:
    """Whether parameter `name` is an Engram parameter (`train_engram="all"`) or an Engram table (`"tables"`)."""
    if train_engram not in ("all", "tables"):
        raise ValueError(f"Unknown train_engram {train_engram!r}; use 'all' or 'tables'.")
    return name.endswith(".engram.table.weight") if train_engram == "tables" else ".engram." in name


def set_trainable(model: nn.Module, mode: str) -> None:
    """Choose what trains: `"engram"` (Engram parameters; backbone frozen), `"tables"` or `"full"` (everything).

    `"tables"` trains only the Engram tables: W_K, W_V, the norms and the conv keep their values, so after
    `empty_memory_` training changes nothing but the rows of the n-grams it sees.
    """
    if mode not in ("engram", "tables", "full"):
        raise ValueError(f"Unknown training mode {mode!r}; use 'engram', 'tables' or 'full' (LoRA: `engram_lora`).")
    for name, param in model.named_parameters():
        param.requires_grad_(mode == "full" or is_engram_parameter(name, "all" if mode == "engram" else mode))


class EngramOptimizer(torch.optim.Optimizer):
    """AdamW for dense groups plus a sparse-aware method for Engram table groups, in one optimizer.

    Each param group has a `method`: `"adamw"` (decoupled weight decay, dense gradients), `"adam"` (lazy Adam: a sparse
    gradient updates only its rows and their moments; bias correction uses the group's step count, like
    `torch.optim.SparseAdam`) or `"rowwise_adagrad"` (one float32 accumulator per row: `G[r] += mean(g[r]^2)`,
    `w[r] -= lr * g[r] / (sqrt(G[r]) + eps)`). Sparse methods accept dense gradients too (their non-zero rows are
    updated). A single `Optimizer` keeps Trainer's LR schedulers, checkpointing and accelerate wrapping working.

    Plain row-wise Adagrad moves a row by exactly `lr` (RMS) on its first step, however small its gradient, so rows
    touched once by noise jump as far as the rows a batch is about. With `damp_first_step` (default) a row's accumulator
    starts at the median of this step's `mean(g[r]^2)` over the table's rows: a new row with a median gradient moves by
    `lr / sqrt(2)`, one with a much larger gradient by almost `lr`, one with a much smaller gradient proportionally
    less. The median is per table and per step, so the damping follows the gradients' scale (no constant to tune).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        method: str = "adamw",
        damp_first_step: bool = True,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, method=method,
                        damp_first_step=damp_first_step)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["method"] not in TABLE_METHODS:
                raise ValueError(f"Unknown optimizer method {group['method']!r}; choose from {TABLE_METHODS}.")

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to its parameter's dtype on load; the row-wise accumulator stays float32
        saved = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = dict(zip(saved, chain.from_iterable(group["params"] for group in self.param_groups)))
        sums = {params[index]: state["sum"] for index, state in state_dict["state"].items() if "sum" in state}
        super().load_state_dict(state_dict)
        for param, total in sums.items():
            self.state[param]["sum"] = total.to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if group["method"] == "adamw":
                    if param.grad.is_sparse:
                        raise RuntimeError(
                            f"Param group {group.get('name', '?')!r} uses dense AdamW but got a sparse gradient; put "
                            "Engram tables in a group with method 'adam' or 'rowwise_adagrad' (build_optimizer does)."
                        )
                    self._adamw(param, group)
                else:
                    self._sparse_step(param, group)
        return loss

    def _adamw(self, param: torch.Tensor, group: dict) -> None:
        state, grad = self.state[param], param.grad
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step = state["step"].item()
        param.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))

    def _sparse_step(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        if param.dim() != 2:
            raise RuntimeError(f"Method {group['method']!r} updates the rows of 2-D tables, got a {param.dim()}-D parameter.")
        grad = grad.coalesce() if grad.is_sparse else grad.to_sparse(sparse_dim=1)
        rows, values = grad.indices()[0], grad.values().to(param.dtype)  # [n], [n, dim]
        state, lr, eps = self.state[param], group["lr"], group["eps"]
        if group["method"] == "rowwise_adagrad":
            if not state:
                state["sum"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)  # [rows]
            square = values.float().pow(2).mean(1)  # [n]
            # (a state saved before this option existed was trained undamped: it resumes so)
            if group.get("damp_first_step", False) and len(square):  # a new row starts at this step's median
                square = square + (state["sum"][rows] == 0) * square.median()
            accumulated = state["sum"].index_add_(0, rows, square)[rows]  # [n]
            update = values / (accumulated.sqrt().add_(eps)).to(param.dtype)[:, None]
        else:
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            step = state["step"].item()
            exp_avg = state["exp_avg"][rows].lerp_(values, 1 - beta1)  # [n, dim]
            exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
            state["exp_avg"][rows], state["exp_avg_sq"][rows] = exp_avg, exp_avg_sq
            update = (exp_avg / (1 - beta1**step)) / (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        if group["weight_decay"]:
            update = update + group["weight_decay"] * param[rows]  # decoupled, on this step's rows only
        param.index_add_(0, rows, update, alpha=-lr)


def build_optimizer(
    model: nn.Module,
    lr: float,
    table_optimizer: str = "adam",
    table_lr_multiplier: float = 5.0,
    engram_lr: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    sparse_tables: bool = True,
    damp_first_step: bool = True,
) -> EngramOptimizer:
    """Split trainable parameters into Engram tables, dense Engram parameters and backbone, and build the optimizer.

    Dense Engram parameters (W_K, W_V, norms, conv) train with AdamW at `engram_lr` (default `lr`), the backbone at
    `lr`, with `weight_decay` on matrices only. Tables get `engram_lr * table_lr_multiplier` and no weight decay (the
    paper's recipe) with `table_optimizer` ("adam": lazy sparse Adam, two moment copies of the table;
    "rowwise_adagrad": one float per row, its first step damped unless `damp_first_step=False`, see
    `EngramOptimizer`; "adamw": dense AdamW, only with `sparse_tables=False`). Frozen parameters (`requires_grad=False`)
    are left out.
    """
    if table_optimizer not in TABLE_METHODS:
        raise ValueError(f"Unknown table_optimizer {table_optimizer!r}; choose from {TABLE_METHODS}.")
    if sparse_tables and table_optimizer not in _SPARSE_METHODS:
        raise ValueError(
            f"table_optimizer={table_optimizer!r} cannot take sparse table gradients (dense AdamW rejects them); use "
            "table_optimizer='adam' (lazy sparse Adam) or 'rowwise_adagrad', or pass sparse_tables=False."
        )
    set_sparse_tables(model, sparse_tables)
    table_params = {id(table.weight) for table in engram_tables(model)}
    engram_lr = lr if engram_lr is None else engram_lr
    groups = {
        "engram_tables": {"lr": engram_lr * table_lr_multiplier, "weight_decay": 0.0, "method": table_optimizer},
        "engram": {"lr": engram_lr},
        "engram_no_decay": {"lr": engram_lr, "weight_decay": 0.0},
        "backbone": {},
        "backbone_no_decay": {"weight_decay": 0.0},
    }
    for name, group in groups.items():
        group.update(params=[], name=name)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in table_params:
            key = "engram_tables"
        else:
            key = ("engram" if is_engram_parameter(name) else "backbone") + ("_no_decay" if param.dim() < 2 else "")
        groups[key]["params"].append(param)
    param_groups = [group for group in groups.values() if group["params"]]
    if not param_groups:
        raise ValueError("The model has no trainable parameters.")
    return EngramOptimizer(
        param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, damp_first_step=damp_first_step
    )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, group_name: str | None = None) -> int:
    """Bytes of optimizer state (all groups, or the group called `group_name`)."""
    total = 0
    for group in optimizer.param_groups:
        if group_name is not None and group.get("name") != group_name:
            continue
        for param in group["params"]:
            total += sum(t.numel() * t.element_size() for t in optimizer.state.get(param, {}).values() if torch.is_tensor(t))
    return total


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the global gradient norm over dense and sparse gradients alike; returns the norm before clipping.

    Sparse gradients are coalesced first (duplicate rows summed), so their norm is the norm of the dense gradient they
    stand for; a sparse gradient is never skipped.
    """
    if isinstance(parameters, torch.Tensor):  # a single tensor, as torch.nn.utils.clip_grad_norm_ accepts
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = []
    for param in params:
        if param.grad.is_sparse:
            param.grad = param.grad.coalesce()
            values = param.grad.values()
        else:
            values = param.grad
        norms.append(torch.linalg.vector_norm(values, norm_type, dtype=torch.float32))
    device = norms[0].device
    norms = torch.stack([n.to(device) for n in norms])
    total = norms.max() if math.isinf(norm_type) else torch.linalg.vector_norm(norms, norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for param in params:
        param.grad.mul_(coef.to(param.grad.device, param.grad.dtype))
    return total
