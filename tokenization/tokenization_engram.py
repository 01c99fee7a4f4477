"""Tokenizer compression (design §1): the surjective raw-id -> compressed-id map, and a tokenizer wrapper carrying it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import Regex, normalizers

from ..modeling.hashing_engram import check_token_ids

_SENTINEL = "\ue000"


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def build_compression_map(tokenizer) -> tuple[torch.Tensor, int]:
    """Map every raw id `0 .. len(tokenizer)-1` to its compressed id.

    Returns:
        `(compression_map, compressed_vocab_size)`: an int64 tensor `[len(tokenizer)]` and V'.
    """
    normalizer = _normalizer()
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    key_to_id: dict[str, int] = {}
    mapping = np.empty(n, dtype=np.int64)
    for raw_id, text in enumerate(texts):
        if "\ufffd" in text:  # partial UTF-8 byte token: keep the raw token string
            key = tokenizer.convert_ids_to_tokens(raw_id)
        else:
            key = normalizer.normalize_str(text) or text
        mapping[raw_id] = key_to_id.setdefault(key, len(key_to_id))
    return torch.from_numpy(mapping), len(key_to_id)


class EngramTokenizer:
    """Wraps any Hugging Face tokenizer: encodes and decodes exactly like it, and adds the Engram compression map.

    Attributes:
        tokenizer: the wrapped tokenizer.
        compression_map: int64 `[len(tokenizer)]` raw id -> compressed id.
        compressed_vocab_size: V'.
    """

    def __init__(self, tokenizer, compression_map: torch.Tensor | None = None, compressed_vocab_size: int | None = None):
        if compression_map is None:
            compression_map, compressed_vocab_size = build_compression_map(tokenizer)
        elif compression_map.shape[0] != len(tokenizer):
            raise ValueError(
                f"Compression map covers {compression_map.shape[0]} ids but the tokenizer has {len(tokenizer)}."
            )
        self.tokenizer = tokenizer
        self.compression_map = compression_map
        self.compressed_vocab_size = (
            int(compressed_vocab_size) if compressed_vocab_size is not None else int(compression_map.max()) + 1
        )

    @property
    def reduction(self) -> float:
        """Fraction of raw ids removed by compression, `1 - V' / V`."""
        return 1.0 - self.compressed_vocab_size / len(self.tokenizer)

    def compress(self, ids) -> torch.Tensor:
        """Raw ids (any int array shape) -> compressed ids; out-of-range ids raise a `ValueError`."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        check_token_ids(ids, self.compression_map.shape[0])
        return self.compression_map[ids]

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str) -> Any:
        if name == "tokenizer":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __repr__(self) -> str:
        return (
            f"EngramTokenizer(V={len(self)}, V'={self.compressed_vocab_size}, "
            f"reduction={self.reduction:.1%}, tokenizer={type(self.tokenizer).__name__})"
        )
