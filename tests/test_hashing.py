"""N-gram hashing (design §2): golden vectors, structural properties, padding and bad input."""

import json
from pathlib import Path

import pytest
import torch

from engram_hf import NgramHasher
from engram_hf.modeling.hashing_engram import layer_multipliers, table_primes

# DeepSeek's reference vectors, carried by the repository (origin: tests/data/README.md)
GOLDEN = Path(__file__).resolve().parent / "data" / "hash_vectors.json"
CASES = json.loads(GOLDEN.read_text())["cases"]


def _hasher(case, compression_map=None):
    return NgramHasher(
        case["layer_ids"],
        case["max_ngram_size"],
        case["n_head_per_ngram"],
        case["engram_vocab_size"],
        case["compressed_vocab_size"],
        case["compressed_pad_id"],  # identity map: the raw pad id is the compressed pad id
        case["seed"],
        compression_map=compression_map,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c['max_ngram_size']}K{c['n_head_per_ngram']}V{c['compressed_vocab_size']}")
def test_golden_vectors(case):
    hasher = _hasher(case)
    for i, layer_id in enumerate(case["layer_ids"]):
        assert hasher.primes[layer_id] == case["primes"][str(layer_id)]
        assert hasher.multipliers[i].tolist() == case["multipliers"][str(layer_id)]
    ids = torch.tensor(case["compressed_input_ids"])
    local = hasher.hash_compressed(ids)
    via_call = hasher(ids)  # identity compression map
    for i, layer_id in enumerate(case["layer_ids"]):
        assert local[:, :, i].tolist() == case["hash_ids"][str(layer_id)]
        assert torch.equal(via_call[layer_id], local[:, :, i])


def _reference_hash(ids, multipliers, primes, pad, n):
    """Plain-Python recomputation of design §2 for one layer."""
    out = []
    for row in ids:
        row_out = []
        for t in range(len(row)):
            cols = []
            for order in range(2, n + 1):
                mix = 0
                for j in range(order):
                    token = row[t - j] if t - j >= 0 else pad
                    mix ^= (token * multipliers[j]) & (2**64 - 1)
                mix = mix - 2**64 if mix >= 2**63 else mix
                cols += [mix % p for p in primes[order - 2]]
            row_out.append(cols)
        out.append(row_out)
    return out


def test_matches_plain_python_reference():
    case = dict(layer_ids=[0, 3], max_ngram_size=4, n_head_per_ngram=3, engram_vocab_size=[101, 211, 307],
                compressed_vocab_size=500, compressed_pad_id=7, seed=5)
    hasher = _hasher(case)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    rows = hasher(ids)
    for layer_id in case["layer_ids"]:
        mults = layer_multipliers(layer_id, 4, 500, 5)
        expected = _reference_hash(ids.tolist(), mults, hasher.primes[layer_id], 7, 4)
        assert rows[layer_id].tolist() == expected


def test_primes_distinct_and_above_base():
    primes = table_primes([0, 1, 2], 3, 4, [50, 50])
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(flat) == len(set(flat)) == 24
    assert min(flat) > 49


def test_multipliers_odd_and_no_overflow():
    for v in (1000, 99092, 2**20):
        mults = layer_multipliers(1, 3, v, 0)
        assert all(m % 2 == 1 and 0 < m and (v - 1) * m < 2**63 for m in mults)


@pytest.fixture(scope="module")
def hasher3():
    return NgramHasher([1, 2], 3, 4, [997, 1009], 1000, 0, 3, compression_map=torch.arange(1200) % 1000, map_size=1200)


def test_prefix_and_locality(hasher3):
    ids = torch.randint(0, 1200, (3, 20), generator=torch.Generator().manual_seed(1))
    full = hasher3.hash_compressed(hasher3.compress(ids))
    # the hash of a prefix is the prefix of the hash
    assert torch.equal(hasher3.hash_compressed(hasher3.compress(ids[:, :11])), full[:, :11])
    # position t depends only on tokens t-N+1..t
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 1000
    diff = (hasher3.hash_compressed(hasher3.compress(changed)) != full).any(-1).any(-1).any(0)
    assert diff.nonzero().flatten().tolist() == [8, 9, 10]


def test_incremental_equals_full(hasher3):
    ids = torch.randint(0, 1200, (2, 15), generator=torch.Generator().manual_seed(2))
    compressed = hasher3.compress(ids)
    full = hasher3.hash_compressed(compressed)
    for start in range(1, 15):
        context = compressed[:, max(0, start - 2) : start]
        if context.shape[1] < 2:
            context = torch.cat([torch.zeros(2, 2 - context.shape[1], dtype=torch.long), context], 1)
        step = hasher3.hash_compressed(compressed[:, start : start + 1], context)
        assert torch.equal(step, full[:, start : start + 1])


def test_left_padding_hashes_like_unpadded(hasher3):
    ids = torch.randint(1, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.full((1, 4), 999), ids], 1)  # pad positions hold an arbitrary id
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
    plain = hasher3(ids)
    masked = hasher3(padded, mask)
    for layer_id in plain:
        assert torch.equal(masked[layer_id][:, 4:], plain[layer_id])


def test_global_rows_add_offsets(hasher3):
    ids = torch.randint(0, 1200, (1, 5))
    local, glob = hasher3(ids), hasher3(ids, global_rows=True)
    for i, layer_id in enumerate(hasher3.layer_ids):
        assert torch.equal(glob[layer_id] - local[layer_id], hasher3.offsets[i].expand_as(local[layer_id]))
        assert int(glob[layer_id].max()) < hasher3.rows_per_layer(layer_id)


@pytest.mark.parametrize("bad", [-1, 1200, 5000])
def test_out_of_range_ids(hasher3, bad):
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(ValueError, match=rf"{bad}.*vocabulary size 1200"):
        hasher3(ids)
