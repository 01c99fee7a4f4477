"""Engram config fields: defaults, round trip and every bad value (ValueError when the config is built)."""

import pytest

from engram_hf import EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config

BASE = dict(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=30, num_attention_heads=4)


@pytest.mark.parametrize("cls", [EngramLlamaConfig, EngramQwen2Config, EngramQwen3Config])
def test_defaults_and_round_trip(cls):
    config = cls(**BASE, engram_compressed_vocab_size=400)
    assert config.engram_layer_ids == [1, 15]  # the paper's placement
    assert config.engram_vocab_size == [2000, 2000]  # 5 x V' per order
    assert config.engram_map_size == 500 and config.engram_hc_mult == 1 and config.engram_use_short_conv
    again = cls.from_dict(config.to_dict())
    assert {k: v for k, v in again.to_dict().items() if k.startswith("engram_")} == {
        k: v for k, v in config.to_dict().items() if k.startswith("engram_")
    }
    assert config.model_type.startswith("engram_")


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(engram_vocab_size=[100]), "one size per n-gram order"),
        (dict(engram_vocab_size=[100, 0]), "positive sizes"),
        (dict(engram_n_embed_per_ngram=30, engram_n_head_per_ngram=8), "divisible"),
        (dict(engram_max_ngram_size=1, engram_vocab_size=[]), ">= 2"),
        (dict(engram_n_head_per_ngram=0), "engram_n_head_per_ngram must be positive"),
        (dict(engram_kernel_size=0), "engram_kernel_size must be positive"),
        (dict(engram_layer_ids=[1, 30]), "below num_hidden_layers=30"),
        (dict(engram_layer_ids=[-1]), "below num_hidden_layers"),
        (dict(engram_layer_ids=[]), "at least one"),
        (dict(engram_compressed_vocab_size=600), "cannot exceed engram_map_size"),
        (dict(engram_pad_token_id=500), "outside the compression map"),
    ],
)
def test_bad_values(fields, message):
    with pytest.raises(ValueError, match=message):
        EngramLlamaConfig(**BASE, **fields)


def test_default_engram_layer_ids_are_distinct_for_any_depth():
    from engram_hf.modeling.configuration_engram import default_engram_layer_ids

    assert default_engram_layer_ids(30) == [1, 15] and default_engram_layer_ids(1) == [0]
    for depth in range(1, 9):
        ids = default_engram_layer_ids(depth)
        assert ids and len(set(ids)) == len(ids) and all(0 <= i < depth for i in ids)
