"""Tokenizer compression (design §1) on real vocabularies, and the EngramTokenizer wrapper."""

import pytest
import torch

from engram_hf import EngramTokenizer, build_compression_map
from engram_hf.tokenization.tokenization_engram import _normalizer

import realdata


def test_deepseek_v3_vocabulary():
    tokenizer = realdata.deepseek_tokenizer()
    mapping, v_prime = build_compression_map(tokenizer)
    assert len(tokenizer) == 129_280 and mapping.shape == (129_280,) and mapping.dtype == torch.int64
    assert v_prime == 99_092
    assert int(mapping.max()) == v_prime - 1 and torch.unique(mapping).numel() == v_prime


@pytest.fixture(scope="module")
def smollm2():
    return EngramTokenizer(realdata.smollm2_tokenizer())


def test_smollm2_vocabulary(smollm2):
    assert len(smollm2) == 49_152
    assert smollm2.compressed_vocab_size == 32_873
    assert smollm2.reduction == pytest.approx(1 - 32_873 / 49_152)


def test_qwen25_vocabulary():
    tokenizer = realdata.qwen25_tokenizer()
    _, v_prime = build_compression_map(tokenizer)
    assert len(tokenizer) == 151_665 and v_prime == 107_453


def test_map_merges_case_and_space_variants(smollm2):
    # first-seen order: a key's compressed id is the one of its lowest raw id
    ids = {t: smollm2.convert_tokens_to_ids(t) for t in ("the", "The", "Ġthe", "ĠThe", "THE")}
    compressed = {t: int(smollm2.compression_map[i]) for t, i in ids.items()}
    assert compressed["the"] == compressed["The"] == compressed["THE"] == compressed["Ġthe"] == compressed["ĠThe"]
    n = _normalizer()
    assert n.normalize_str(" ") == " " and n.normalize_str("  Héllo\n") == "hello"


def test_wrapper_behaves_like_tokenizer(smollm2):
    text = "Engram keeps a conditional memory. Ünïcödé too!"
    inner = smollm2.tokenizer
    assert smollm2(text)["input_ids"] == inner(text)["input_ids"]
    ids = smollm2.encode(text)
    assert smollm2.decode(ids) == inner.decode(ids)
    assert torch.equal(smollm2.compress(ids), smollm2.compression_map[torch.tensor(ids)])
    assert "V'=32873" in repr(smollm2)


def test_wrapper_rejects_bad_ids_and_maps(smollm2):
    with pytest.raises(ValueError, match="49152.*vocabulary size 49152"):
        smollm2.compress([1, 49_152])
    with pytest.raises(ValueError, match="-3"):
        smollm2.compress([[-3]])
    with pytest.raises(ValueError, match="covers 10 ids but the tokenizer has 49152"):
        EngramTokenizer(smollm2.tokenizer, torch.zeros(10, dtype=torch.long), 1)
