"""Configurations of the Engram model families: the base family's config plus the `engram_*` fields."""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

TABLE_DEVICES = ("host", "device", "auto")
# "auto" keeps a table in host memory above this many parameters (512 MiB in float32, 256 MiB in bfloat16)
ENGRAM_AUTO_HOST_PARAMETERS = 2**27


def default_engram_layer_ids(num_hidden_layers: int) -> list[int]:
    """Layer 1 and half depth (design §3), distinct for any depth: `[0]` for 1 layer, `[1]` for 2 or 3."""
    return sorted({min(1, num_hidden_layers - 1), num_hidden_layers // 2})


@dataclass(repr=False)
class EngramConfigMixin:
    """Engram fields shared by every family (design §2-§3); unset values get defaults from the base config.

    engram_layer_ids: 0-based decoder layers carrying Engram (default: `default_engram_layer_ids`).
    engram_max_ngram_size: largest n-gram order N (orders 2..N).
    engram_n_embed_per_ngram: memory width per order, split over the heads.
    engram_n_head_per_ngram: hash heads K per order.
    engram_vocab_size: base table size per order (default: 5 x the compressed vocabulary).
    engram_kernel_size: ShortConv kernel size (dilation is N).
    engram_seed: seed of the hash multipliers.
    engram_pad_token_id: raw pad id, hashed through the compression map.
    engram_compressed_vocab_size: V', checked against the stored map at load.
    engram_map_size: number of raw ids covered by the compression map (`len(tokenizer)`).
    engram_hc_mult: hyper-connection branches (1 for Llama/Qwen).
    engram_use_short_conv: whether the dilated ShortConv runs.
    engram_proj_bias: bias on W_K and W_V.
    engram_norm_eps: epsilon of every Engram RMSNorm.
    engram_table_device: where the tables live: "host" (host memory under any `device_map` and `.to(device)`; only
        the addressed rows travel), "device" (with the rest of their decoder layer), or "auto" (host for a table
        of more than `ENGRAM_AUTO_HOST_PARAMETERS` parameters, else with its layer). Also a `from_pretrained` option.
    """

    engram_layer_ids: list[int] | None = None
    engram_max_ngram_size: int = 3
    engram_n_embed_per_ngram: int = 512
    engram_n_head_per_ngram: int = 8
    engram_vocab_size: list[int] | None = None
    engram_kernel_size: int = 4
    engram_seed: int = 0
    engram_pad_token_id: int | None = None
    engram_compressed_vocab_size: int | None = None
    engram_map_size: int | None = None
    engram_hc_mult: int = 1
    engram_use_short_conv: bool = True
    engram_proj_bias: bool = False
    engram_norm_eps: float = 1e-5
    engram_table_device: str = "host"

    def _fill_engram_defaults(self) -> None:
        if self.engram_layer_ids is None:
            self.engram_layer_ids = default_engram_layer_ids(self.num_hidden_layers)
        self.engram_layer_ids = [int(i) for i in self.engram_layer_ids]
        if self.engram_map_size is None:
            self.engram_map_size = self.vocab_size
        if self.engram_compressed_vocab_size is None:
            self.engram_compressed_vocab_size = self.engram_map_size
        if self.engram_vocab_size is None:
            self.engram_vocab_size = [5 * self.engram_compressed_vocab_size] * (self.engram_max_ngram_size - 1)
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        if self.engram_pad_token_id is None:
            eos = self.eos_token_id[0] if isinstance(self.eos_token_id, list) else self.eos_token_id
            self.engram_pad_token_id = next((i for i in (self.pad_token_id, eos) if i is not None), 0)

    def validate_engram(self) -> None:
        """Raise `ValueError` naming the first inconsistent Engram field."""
        n = self.engram_max_ngram_size
        if n < 2:
            raise ValueError(f"engram_max_ngram_size must be >= 2, got {n}.")
        for name in ("engram_n_embed_per_ngram", "engram_n_head_per_ngram", "engram_kernel_size", "engram_hc_mult",
                     "engram_compressed_vocab_size", "engram_map_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if len(self.engram_vocab_size) != n - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{n} ({n - 1} values), got {self.engram_vocab_size}."
            )
        if any(v <= 0 for v in self.engram_vocab_size):
            raise ValueError(f"engram_vocab_size must hold positive sizes, got {self.engram_vocab_size}.")
        if self.engram_n_embed_per_ngram % self.engram_n_head_per_ngram:
            raise ValueError(
                f"engram_n_embed_per_ngram ({self.engram_n_embed_per_ngram}) must be divisible by "
                f"engram_n_head_per_ngram ({self.engram_n_head_per_ngram})."
            )
        if self.engram_table_device not in TABLE_DEVICES:
            raise ValueError(
                f"engram_table_device must be one of {', '.join(TABLE_DEVICES)}, got {self.engram_table_device!r}."
            )
        if not self.engram_layer_ids:
            raise ValueError("engram_layer_ids must name at least one decoder layer.")
        bad = [i for i in self.engram_layer_ids if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.engram_layer_ids)) != len(self.engram_layer_ids):
            raise ValueError(
                f"engram_layer_ids {self.engram_layer_ids} must be distinct 0-based layer indices below "
                f"num_hidden_layers={self.num_hidden_layers}."
            )
        if self.engram_compressed_vocab_size > self.engram_map_size:
            raise ValueError(
                f"engram_compressed_vocab_size ({self.engram_compressed_vocab_size}) cannot exceed engram_map_size "
                f"({self.engram_map_size})."
            )
        if not 0 <= self.engram_pad_token_id < self.engram_map_size:
            raise ValueError(
                f"engram_pad_token_id {self.engram_pad_token_id} is outside the compression map (size {self.engram_map_size})."
            )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._fill_engram_defaults()
        self.validate_engram()


@strict
class EngramLlamaConfig(EngramConfigMixin, LlamaConfig):
    model_type = "engram_llama"


@strict
class EngramQwen2Config(EngramConfigMixin, Qwen2Config):
    model_type = "engram_qwen2"


@strict
class EngramQwen3Config(EngramConfigMixin, Qwen3Config):
    model_type = "engram_qwen3"
