"""Engram n-gram hashing (design §2): multipliers, prime table sizes and vectorised row ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import sympy
import torch


# the config fields that decide every row id; a checkpoint stores their values (`NgramHasher.geometry`)
GEOMETRY_FIELDS = (
    "engram_seed", "engram_pad_token_id", "engram_layer_ids", "engram_max_ngram_size", "engram_n_head_per_ngram",
    "engram_vocab_size",
)


def _digest(values: Sequence[int]) -> int:
    """A stable non-negative int64 digest of a list of ints."""
    return int(hashlib.sha256(json.dumps([int(v) for v in values]).encode()).hexdigest()[:15], 16)


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a `ValueError` naming the first id outside `0 .. vocab_size - 1` (one reduction: one accelerator sync)."""
    if ids.numel():
        bounds = torch.aminmax(ids)
        if int(bounds.min) < 0 or int(bounds.max) >= vocab_size:
            bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
            raise ValueError(
                f"Token id {bad} is out of range for the Engram compression map (vocabulary size {vocab_size})."
            )


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
        # [N, L, (N-1)*K]: multiplier of window position i (look-back N-1-i) for each column, 0 beyond its order
        self.register_buffer(
            "window_multipliers", torch.empty(max_ngram_size, len(self.layer_ids), n_cols, dtype=torch.long), False
        )
        # [len(GEOMETRY_FIELDS)] what the tables were made for; persistent: checked against the config at load
        self.register_buffer("geometry", self.expected_geometry())
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

    def expected_geometry(self) -> torch.Tensor:
        """`[len(GEOMETRY_FIELDS)]` int64 values of the settings that decide every row id (lists as digests)."""
        values = [self.seed, self.pad_token_id, _digest(self.layer_ids), self.max_ngram_size, self.n_head_per_ngram,
                  _digest(self.engram_vocab_size)]
        return torch.tensor(values, dtype=torch.long)

    def geometry_mismatch(self) -> list[str]:
        """Names of the `GEOMETRY_FIELDS` whose stored value differs from this hasher's settings."""
        stored, expected = self.geometry.cpu(), self.expected_geometry()
        return [name for name, a, b in zip(GEOMETRY_FIELDS, stored.tolist(), expected.tolist()) if a != b]

    @property
    def compressed_pad_id(self) -> int:
        return int(self.compression_map[self.pad_token_id])

    @property
    def context_size(self) -> int:
        """Number of previous compressed ids a position needs (N - 1)."""
        return self.max_ngram_size - 1

    def pad_context(self, batch_size: int) -> torch.Tensor:
        """`[B, N-1]` compressed pad ids, the context before a sequence's start (a view: no host sync)."""
        return self.compression_map[self.pad_token_id].expand(batch_size, self.context_size)

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
        n, k = self.max_ngram_size, self.n_head_per_ngram
        window = [  # position i of a window holds look-back n-1-i, which only orders > n-1-i use
            [[m[n - 1 - i] if n - 1 - i < order else 0 for order in range(2, n + 1) for _ in range(k)] for m in mults]
            for i in range(n)
        ]
        self.window_multipliers = torch.tensor(window, dtype=torch.long, device=device)

    def hash_window(self, window: torch.Tensor) -> torch.Tensor:
        """Per-head row ids `[B, T, L, (N-1)*K]` (before offsets) of the last T of `[B, N-1+T]` compressed ids.

        The first N-1 ids of `window` are the context of the first new position; columns ordered by order, then head.
        """
        n = self.max_ngram_size
        batch, seq = window.shape[0], window.shape[1] - n + 1
        step = window.stride()
        windows = window.as_strided((batch, seq, n, 1, 1), (step[0], step[1], step[1], 0, 0))  # ids t-N+1 .. t
        products = windows * self.window_multipliers  # [B, T, N, L, (N-1)*K]; 0 (XOR identity) beyond each order
        *earlier, mix = products.unbind(2)  # mix: [B, T, L, (N-1)*K], look-back 0
        for product in earlier:
            mix ^= product
        return torch.remainder(mix, self.moduli)

    def hash_compressed(self, compressed_ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head row ids of already-compressed ids.

        Args:
            compressed_ids: `[B, T]` int64 compressed ids; padded positions must already hold the compressed pad id.
            context: `[B, N-1]` compressed ids preceding `compressed_ids` (default: the compressed pad id).

        Returns:
            `[B, T, L, (N-1)*K]` row ids, before per-head offsets; columns ordered by order, then head.
        """
        if context is None:
            context = self.pad_context(compressed_ids.shape[0])
        return self.hash_window(torch.cat([context, compressed_ids], dim=1))

    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, T]` raw ids -> compressed ids; positions with `attention_mask == 0` become the compressed pad id."""
        input_ids = input_ids.long()  # int32 ids too, as the base model's embedding takes them
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(attention_mask[:, -input_ids.shape[1] :] == 0, self.pad_token_id)
        # the clear error needs a host sync, kept out of compiled graphs (there `take` itself rejects a bad id)
        if not torch.compiler.is_compiling():
            check_token_ids(input_ids, self.compression_map.shape[0])
        return self.compression_map.take(input_ids)

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
