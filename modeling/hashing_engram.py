"""Engram n-gram hashing (spec §2): multipliers, prime table sizes and vectorised row ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sympy
import torch


def layer_multipliers(layer_id: int, max_ngram_size: int, compressed_vocab_size: int, seed: int) -> list[int]:
    """Odd int64 multipliers of one Engram layer, indexed by look-back distance (0 = current token)."""
    half_bound = max(1, (2**63 - 1) // compressed_vocab_size // 2)
    rng = np.random.default_rng(seed + 10007 * layer_id)
    draws = rng.integers(low=0, high=half_bound, size=max_ngram_size, dtype=np.int64)
    return [int(2 * r + 1) for r in draws]


def table_primes(
    layer_ids: Sequence[int], max_ngram_size: int, n_head_per_ngram: int, engram_vocab_size: Sequence[int]
) -> dict[int, list[list[int]]]:
    """Distinct prime row counts, `{layer_id: [[p(order 2, head 0..K-1)], [p(order 3, ...)], ...]}`."""
    used: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for order in range(2, max_ngram_size + 1):
            current, heads = engram_vocab_size[order - 2] - 1, []
            for _ in range(n_head_per_ngram):
                current = sympy.nextprime(current)
                while current in used:
                    current = sympy.nextprime(current)
                used.add(current)
                heads.append(int(current))
            per_order.append(heads)
        primes[layer_id] = per_order
    return primes


class NgramHasher(torch.nn.Module):
    """Hashes compressed n-grams into per-head table rows for every Engram layer at once.

    Holds the multipliers `[L, N]`, the primes `[L, (N-1)*K]` and per-head row offsets `[L, (N-1)*K]` as
    non-persistent buffers: they are rebuilt deterministically from the configuration values.
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        engram_vocab_size: Sequence[int],
        compressed_vocab_size: int,
        pad_token_id: int,
        seed: int,
        compression_map: torch.Tensor | None = None,
        map_size: int | None = None,
    ):
        super().__init__()
        if compression_map is None:  # identity (no compression) until a real map is installed or loaded
            compression_map = torch.arange(map_size if map_size is not None else compressed_vocab_size) % compressed_vocab_size
        # [V] raw id -> compressed id; persistent: the map is a property of the checkpoint
        self.register_buffer("compression_map", compression_map.to(torch.long).clone())
        self.pad_token_id = pad_token_id
        self.layer_ids = list(layer_ids)
        self.max_ngram_size = max_ngram_size
        self.n_head_per_ngram = n_head_per_ngram
        self.engram_vocab_size = list(engram_vocab_size)
        self.compressed_vocab_size = compressed_vocab_size
        self.seed = seed
        self.primes = table_primes(self.layer_ids, max_ngram_size, n_head_per_ngram, self.engram_vocab_size)
        self.register_buffer("multipliers", torch.empty(len(self.layer_ids), max_ngram_size, dtype=torch.long), False)
        n_cols = (max_ngram_size - 1) * n_head_per_ngram
        self.register_buffer("moduli", torch.empty(len(self.layer_ids), n_cols, dtype=torch.long), False)
        self.register_buffer("offsets", torch.empty(len(self.layer_ids), n_cols, dtype=torch.long), False)
        self.register_buffer("column_order", torch.empty(n_cols, dtype=torch.long), False)  # order index per column
        self.reset_constants()

    @classmethod
    def from_config(cls, config, compression_map: torch.Tensor | None = None) -> "NgramHasher":
        """Build from the `engram_*` fields of a model config."""
        return cls(
            config.engram_layer_ids,
            config.engram_max_ngram_size,
            config.engram_n_head_per_ngram,
            config.engram_vocab_size,
            config.engram_compressed_vocab_size,
            config.engram_pad_token_id,
            config.engram_seed,
            compression_map=compression_map,
            map_size=config.engram_map_size,
        )

    @property
    def compressed_pad_id(self) -> int:
        return int(self.compression_map[self.pad_token_id])

    @property
    def context_size(self) -> int:
        """Number of previous compressed ids a position needs (N - 1)."""
        return self.max_ngram_size - 1

    def rows_per_layer(self, layer_id: int) -> int:
        """Total rows of the single table of `layer_id` (sum of its per-head primes)."""
        return sum(sum(heads) for heads in self.primes[layer_id])

    @torch.no_grad()
    def reset_constants(self) -> None:
        """(Re)fill the constant buffers; needed after meta-device construction."""
        device = self.multipliers.device if self.multipliers.device.type != "meta" else None
        mults = [
            layer_multipliers(l, self.max_ngram_size, self.compressed_vocab_size, self.seed) for l in self.layer_ids
        ]
        moduli = [[p for heads in self.primes[l] for p in heads] for l in self.layer_ids]
        offsets = [np.concatenate([[0], np.cumsum(m)[:-1]]).tolist() for m in moduli]
        self.multipliers = torch.tensor(mults, dtype=torch.long, device=device)
        self.moduli = torch.tensor(moduli, dtype=torch.long, device=device)
        self.offsets = torch.tensor(offsets, dtype=torch.long, device=device)
        self.column_order = torch.arange(self.max_ngram_size - 1, device=device).repeat_interleave(self.n_head_per_ngram)

    def hash_compressed(self, compressed_ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head row ids of already-compressed ids.

        Args:
            compressed_ids: `[B, T]` int64 compressed ids; padded positions must already hold the compressed pad id.
            context: `[B, N-1]` compressed ids preceding `compressed_ids` (default: the compressed pad id).

        Returns:
            `[B, T, L, (N-1)*K]` row ids, before per-head offsets; columns ordered by order, then head.
        """
        n = self.max_ngram_size
        if context is None:
            context = compressed_ids.new_full((compressed_ids.shape[0], n - 1), self.compressed_pad_id)
        windows = torch.cat([context, compressed_ids], dim=1).unfold(1, n, 1)  # [B, T, N]: ids t-N+1 .. t
        products = windows.unsqueeze(2) * self.multipliers.flip(-1)  # [B, T, L, N]; column N-1-j: look-back j
        mix, mixes = products[..., n - 1], []
        for j in range(1, n):  # XOR-accumulate look-backs: mix of order j+1
            mix = mix ^ products[..., n - 1 - j]
            mixes.append(mix)
        mixed = torch.stack(mixes, dim=-1)[..., self.column_order]  # [B, T, L, (N-1)*K]
        return torch.remainder(mixed, self.moduli)

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, T]` raw ids -> compressed ids; positions with `attention_mask == 0` become the compressed pad id."""
        vocab = self.compression_map.shape[0]
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
            raise ValueError(f"Token id {bad} is out of range for the Engram compression map (vocabulary size {vocab}).")
        compressed = self.compression_map[input_ids]
        if attention_mask is not None:
            compressed = compressed.masked_fill(attention_mask[:, -input_ids.shape[1] :] == 0, self.compressed_pad_id)
        return compressed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        global_rows: bool = False,
    ) -> dict[int, torch.Tensor]:
        """Row ids per Engram layer, `{layer_id: [B, T, (N-1)*K]}`, from raw `[B, T]` token ids.

        `context` holds the `[B, N-1]` compressed ids before `input_ids`; `global_rows` adds per-head table offsets.
        """
        rows = self.hash_compressed(self.compress(input_ids, attention_mask), context)
        if global_rows:
            rows = rows + self.offsets
        return {layer_id: rows[:, :, i] for i, layer_id in enumerate(self.layer_ids)}
