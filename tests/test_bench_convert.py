"""Smoke run of `engram-hf bench-convert` on a tiny base: it completes and its JSON carries every field (no timings)."""

import json

from engram_hf.cli import main
from tiny_bases import save_word_level_llama


def test_bench_convert_smoke(tmp_path, capsys):
    base = save_word_level_llama(tmp_path / "base")
    out = tmp_path / "bench.json"
    code = main(["bench-convert", "--base", str(base), "--table-gib", "0.002", "--max-shard-size", "200KB",
                 "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == results
    assert {"base", "base_file_bytes", "table_gib_requested", "max_shard_size", "dtype", "machine",
            "runs"} <= set(results)
    (run,) = results["runs"]
    assert {"verify", "peak_rss_gib", "peak_rss_anon_gib", "peak_rss_file_gib", "base_gib", "table_gib", "target_gib",
            "within_target", "wall_s", "graft_s", "output_gib", "shards", "largest_shard_bytes"} <= set(run)
    assert run["verify"] is False and run["peak_rss_gib"] > 0 and run["shards"] > 2
    assert run["table_gib"] >= 0.002 and run["largest_shard_bytes"] <= 200_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "bench.json"]  # the converted output is deleted


def test_bench_load_smoke(tmp_path, capsys):
    """`engram-hf bench-load` on a tiny base: both checkpoints graft, load and generate; every field is there."""
    base = save_word_level_llama(tmp_path / "base")
    out = tmp_path / "load.json"
    code = main(["bench-load", "--base", str(base), "--table-gib", "0.004", "--ratio-table-gib", "0.002",
                 "--max-shard-size", "400KB", "--tokens", "4", "--ratio-rounds", "1", "--threads", "1",
                 "--workdir", str(tmp_path), "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == results
    large, ratio = results["runs"]
    assert {"target_gib", "within_target"} <= set(large)
    for run in (large, ratio):
        assert {"table_gib", "graft_s", "shards", "load_s", "base_bytes", "cold_ms_per_token", "warm_ms_per_token",
                "peak_rss_gib", "wall_s"} <= set(run)
        assert run["shards"] > 2 and run["peak_rss_gib"] > 0
    assert large["table_gib"] > ratio["table_gib"] > 0.0015 and "decode_ratio" in ratio and ratio["decode_ratio"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "load.json"]
