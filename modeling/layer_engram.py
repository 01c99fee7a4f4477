"""The Engram layer (design §3): table lookup, hidden-state gating, value projection and dilated ShortConv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .configuration_engram import ENGRAM_AUTO_HOST_PARAMETERS
from .integration_engram import get_conv_state

# Cache state of an Engram layer's ShortConv input history (the first Engram layer also holds the token-id history)
CONV_STATE = 0


class EngramRMSNorm(nn.Module):
    """RMSNorm with an explicit epsilon, computed in float32."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        # the float32 constants as 0-d CPU tensors (not buffers: never moved or cast): an op costs less with one than
        # with a Python number, gives the same float32 result, and takes it as a scalar on any device
        self._width = torch.tensor(float(hidden_size), dtype=torch.float32, device="cpu")
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        variance = (x * x).sum(-1, keepdim=True) / self._width  # == x.pow(2).mean(-1), without mean's extra ops
        x = x * torch.rsqrt(variance + self._eps)
        return self.weight * x.to(dtype)


def per_branch(modules: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Applies `modules[m]` to hyper-connection branch m of `x` `[B, T, M, ...]` (one call when M is 1)."""
    if len(modules) == 1:
        return modules[0](x)
    return torch.stack([module(x[:, :, m]) for m, module in enumerate(modules)], dim=2)


class EngramShortConv(nn.Module):
    """Y = SiLU(Conv(RMSNorm(V))): depthwise, causal, dilated over time; history travels with the cache."""

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int, eps: float):
        super().__init__()
        channels = hidden_size * hc_mult
        self.norms = nn.ModuleList(EngramRMSNorm(hidden_size, eps) for _ in range(hc_mult))
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=dilation, bias=False)
        self.conv.engram_zero_init = True
        self.history = (kernel_size - 1) * dilation

    def forward(
        self,
        values: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        layer_idx: int | None = None,
    ) -> torch.Tensor:
        """values `[B, T, M, d]` -> `[B, T, M, d]`; positions with `padding_mask == 0` feed zeros to the conv."""
        batch, seq, hc, dim = values.shape
        normed = per_branch(self.norms, values).flatten(2)  # [B, T, M*d]
        if padding_mask is not None:
            normed = normed * padding_mask[:, -seq:, None].to(normed.dtype)
        x = normed.transpose(1, 2)  # [B, M*d, T]
        if cache is None or get_conv_state(cache, layer_idx, CONV_STATE) is None:
            x = F.pad(x, (self.history, 0))  # zeros before the start (with a cache: kept as the first history)
        if cache is not None:
            x = cache.update_conv_state(x, layer_idx, state_idx=CONV_STATE, conv_kernel_size=self.history)
        # depthwise dilated conv as one multiply-add over the taps (nn.Conv1d's oneDNN path costs far more per step)
        taps = x[..., -(self.history + seq) :].unfold(-1, self.history + 1, 1)[..., :: self.conv.dilation[0]]
        y = F.silu((taps * self.conv.weight).sum(-1))  # taps [B, M*d, T, k] * weight [M*d, 1, k] -> [B, M*d, T]
        return y.transpose(1, 2).reshape(batch, seq, hc, dim)


class EngramTable(nn.Embedding):
    """The hashed-memory table of one Engram layer; by default it stays in host memory (design §6).

    With `keep_on_host` (set from `config.engram_table_device`), `model.to(device)` / `.cuda()` convert its dtype but
    never move it off the host (only moves to the CPU, or materialising it from the meta device, change its device);
    without, it follows the model. The weight is an ordinary parameter, saved and loaded as `...engram.table.weight`.
    """

    def __init__(self, num_rows: int, dim: int, keep_on_host: bool = True):
        super().__init__(num_rows, dim)
        self.keep_on_host = keep_on_host

    def _apply(self, fn, recurse=True):
        weight = self.weight
        if not self.keep_on_host or weight.device.type in ("meta",):
            return super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        if probe.device == weight.device or probe.device.type == "cpu":
            return super()._apply(fn, recurse)
        if probe.dtype == weight.dtype:
            return self
        return super()._apply(lambda t: t.to(dtype=probe.dtype) if t.is_floating_point() else t, recurse)


class EngramLayer(nn.Module):
    """Conditional memory of one decoder layer.

    The table holds the rows of all `(N-1)*K` heads (per-head offsets are added by the hasher). Given the looked-up
    memory `e` `[B, T, d_mem]` and the hidden state `[B, T, M, d]`, returns `Y` `[B, T, M, d]` to add to the residual.
    """

    def __init__(self, config, layer_idx: int, num_rows: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.hc_mult = config.engram_hc_mult
        n_orders = config.engram_max_ngram_size - 1
        self.head_dim = config.engram_n_embed_per_ngram // config.engram_n_head_per_ngram
        self.memory_size = n_orders * config.engram_n_embed_per_ngram
        eps = config.engram_norm_eps
        placement = config.engram_table_device
        on_host = placement == "host" or (placement == "auto" and num_rows * self.head_dim > ENGRAM_AUTO_HOST_PARAMETERS)
        self.table = EngramTable(num_rows, self.head_dim, keep_on_host=on_host)
        self.key_proj = nn.ModuleList(
            nn.Linear(self.memory_size, self.hidden_size, bias=config.engram_proj_bias) for _ in range(self.hc_mult)
        )
        self.norm_key = nn.ModuleList(EngramRMSNorm(self.hidden_size, eps) for _ in range(self.hc_mult))
        self.norm_query = nn.ModuleList(EngramRMSNorm(self.hidden_size, eps) for _ in range(self.hc_mult))
        self.value_proj = nn.Linear(self.memory_size, self.hidden_size, bias=config.engram_proj_bias)
        self.value_proj.engram_zero_init = True
        self.short_conv = (
            EngramShortConv(
                self.hidden_size, self.hc_mult, config.engram_kernel_size, config.engram_max_ngram_size, eps
            )
            if config.engram_use_short_conv
            else None
        )

    def lookup(self, rows: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """`[B, T, (N-1)*K]` global row ids -> memory `[B, T, d_mem]` on `device` (default: the table's).

        Only the addressed rows leave a host-memory table: they are gathered into pinned staging memory and copied
        without blocking, so the copy overlaps with the accelerator's work.
        """
        memory = self.table(rows.to(self.table.weight.device)).flatten(-2)
        if device is None or memory.device == device:
            return memory
        if memory.device.type == "cpu" and device.type == "cuda" and not memory.requires_grad:
            memory = memory.pin_memory()
        return memory.to(device, non_blocking=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        memory: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states `[B, T, M, d]`, memory `[B, T, d_mem]` -> `[B, T, M, d]`."""
        memory = memory.to(device=hidden_states.device, dtype=self.value_proj.weight.dtype)
        memory_branches = memory.unsqueeze(2).expand(-1, -1, self.hc_mult, -1)  # [B, T, M, d_mem], a view
        key = per_branch(self.norm_key, per_branch(self.key_proj, memory_branches))  # [B, T, M, d]
        query = per_branch(self.norm_query, hidden_states)  # [B, T, M, d]
        score = (key * query).sum(-1, keepdim=True) / math.sqrt(self.hidden_size)  # [B, T, M, 1]
        gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
        gated = gate * self.value_proj(memory).unsqueeze(2)  # [B, T, M, d]
        if self.short_conv is None:
            return gated.to(hidden_states.dtype)
        out = gated + self.short_conv(gated, padding_mask, cache, self.layer_idx)
        return out.to(hidden_states.dtype)
