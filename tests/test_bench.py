"""Smoke run of `engram-hf bench` on a tiny model: it completes and its JSON carries every field (no timing asserts)."""

import json

import pytest

from engram_hf.cli import main


@pytest.mark.parametrize(
    "options", [[], ["--compile", "--batch-size", "2", "--dtype", "bfloat16", "--table-device", "device"]],
    ids=["eager", "compiled"],
)
def test_bench_smoke(tmp_path, capsys, options):
    out = tmp_path / "bench"
    code = main(["bench", "--tiny", "--reps", "1", "--prompt-len", "8", "--new-tokens", "2", "--hash-len", "256",
                 "--table-log2", "12", "14", "--out", str(out), "--quiet", *options])
    assert code == 0
    results = json.loads((out / "bench.json").read_text())
    assert set(results) >= {"model", "machine", "geometry", "reps", "settings", "speed", "kernels_per_decode_step",
                            "table_sweep", "table_sweep_ratio", "hashing", "memory"}
    assert results["settings"]["compile"] == ("--compile" in options)
    assert results["settings"]["batch_size"] == (2 if options else 1)
    kernels = results["kernels_per_decode_step"]
    assert kernels["engram"] > kernels["base"] > 0
    for side in ("base", "engram"):
        assert results["speed"][side]["prefill_tok_s"] > 0 and results["speed"][side]["decode_tok_s"] > 0
    assert {"decode_ratio", "prefill_ratio"} <= set(results["speed"])
    assert [row["log2_rows"] for row in results["table_sweep"]] == [12, 14]
    assert {"decode_step_us_ctx128", "decode_step_us_ctx4096", "decode_step_hash_only_us", "prefill_tok_s_torch",
            "prefill_tok_s_numpy_reference", "prefill_speedup"} <= set(results["hashing"])
    assert "bench_process_peak_rss_gib" in results["memory"]
    assert "greedy decode tokens/s" in capsys.readouterr().out


def test_numpy_reference_matches_hasher():
    import numpy as np
    import torch

    from engram_hf import NgramHasher
    from engram_hf.bench import numpy_reference_hash
    from engram_hf.modeling.hashing_engram import layer_multipliers

    hasher = NgramHasher([1, 4], 3, 4, [500, 700], 900, 3, 7)
    ids = torch.randint(0, 900, (2, 30))
    mults = [layer_multipliers(l, 3, 900, 7) for l in (1, 4)]
    ref = numpy_reference_hash(ids.numpy(), mults, hasher.moduli.tolist(), 3, 4, hasher.compressed_pad_id)
    ours = hasher.hash_compressed(hasher.compress(ids))
    for i in range(2):
        assert np.array_equal(ref[i], ours[:, :, i].numpy())
