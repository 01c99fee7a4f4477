"""`engram_twin`: the graft done in memory, for benchmarks and experiments (no files written)."""

from __future__ import annotations

from torch import nn

from ..families import engram_config_from_base, family_of
from ..tokenization.tokenization_engram import build_compression_map


def engram_twin(base: nn.Module, tokenizer, compression=None, **engram_fields) -> nn.Module:
    """An in-memory Engram model holding `base`'s weights, with graft init (computes exactly `base`'s function).

    `compression`: a precomputed `(compression_map, V')` of `tokenizer`; `engram_fields`: `engram_*` config values.
    """
    cmap, v_prime = compression if compression is not None else build_compression_map(tokenizer)
    config = engram_config_from_base(
        base.config, engram_map_size=len(tokenizer), engram_compressed_vocab_size=v_prime, **engram_fields
    )
    model = family_of(base.config).causal_lm_class(config).to(base.dtype)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any("engram" not in key for key in missing):
        raise ValueError(f"Base weights do not fit the Engram model: missing {missing}, unexpected {unexpected}.")
    model.set_compression_map(cmap)
    return model.eval()
