"""`engram-hf knowledge-bench`: a tiny smoke run (no timing or recall assertions) and the fact set."""

from __future__ import annotations

import json

import pytest

from engram_hf.cli import main
from engram_hf.knowledge import RELATIONS, make_facts


def test_facts_are_deterministic_and_distinct():
    facts = make_facts(50, seed=3)
    assert facts == make_facts(50, seed=3) and facts != make_facts(50, seed=4)
    assert len({fact["entity"] for fact in facts}) == 50
    assert {fact["relation"] for fact in facts} == set(RELATIONS)


def test_knowledge_bench_smoke(tmp_path):
    out = tmp_path / "out"
    argv = ["knowledge-bench", "--tiny", "--modes", "lora+engram", "--facts", "6", "--steps", "2", "--batch-size", "2",
            "--table-rows-per-head", "1009", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "knowledge.json").read_text())
    assert report["settings"]["modes"] == ["lora+engram"]
    (result,) = report["results"]
    assert {"recall", "general_loss_before", "general_loss_after", "general_loss_change", "train_seconds",
            "final_train_loss", "optimizer_state_bytes", "trainable_parameters", "peak_rss_gib"} <= set(result)
    assert 0.0 <= result["recall"] <= 1.0
    assert result["optimizer_state_bytes"] > 0 and result["trainable_parameters"] > 0


def test_knowledge_bench_reports_a_failed_mode(tmp_path):
    with pytest.raises(RuntimeError, match="failed"):
        main(["knowledge-bench", "--model", str(tmp_path / "missing.gguf"), "--modes", "engram", "--out", str(tmp_path)])
