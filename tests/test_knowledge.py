"""`engram-hf knowledge-bench`: a tiny smoke run (no timing or recall assertions) and the fact set."""

from __future__ import annotations

import json

import pytest

from engram_hf.cli import main
from engram_hf.knowledge import RELATIONS, _FactData, general_text, make_facts, replay_chunks
from realdata import smollm2_tokenizer


def test_facts_are_deterministic_and_distinct():
    facts = make_facts(50, seed=3)
    assert facts == make_facts(50, seed=3) and facts != make_facts(50, seed=4)
    assert len({fact["entity"] for fact in facts}) == 50
    assert {fact["relation"] for fact in facts} == set(RELATIONS)


def test_replay_text_is_not_the_probe_text():
    probe, replay = general_text("probe"), general_text("replay")
    assert len(probe) >= 40 and len(replay) >= 100
    assert not set(probe) & set(replay)
    chunks = replay_chunks(500, words=20)
    assert len(chunks) == 500 and all(1 <= len(c.split()) <= 20 for c in chunks)
    assert not any(c in p for c in chunks[:50] for p in probe)
    with pytest.raises(ValueError, match="split"):
        general_text("train")


@pytest.mark.parametrize("answer_loss_only", [True, False])
def test_statement_labels_cover_the_answer_only(answer_loss_only):
    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    facts = make_facts(10)
    data = _FactData(tokenizer, facts, replay=0.5, answer_loss_only=answer_loss_only)
    assert len(data) == 20 + 10  # two statements per fact, then replay pieces
    batch = data.collate([data[i] for i in range(len(data))])
    for i, (text, _) in enumerate(data):
        labelled = tokenizer.decode(batch["input_ids"][i][batch["labels"][i] != -100])
        if i < 20 and answer_loss_only:
            assert labelled.strip() == facts[i // 2]["answer"], text
        else:  # replay text (and statements with answer_loss_only=False): every real token
            assert labelled == text


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
