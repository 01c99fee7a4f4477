"""`engram-hf knowledge-bench`: a tiny smoke run (no timing or recall assertions) and the fact set."""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize("loss", ["completion", "answer", "all"])
def test_statement_labels(loss):
    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    facts = make_facts(10)
    data = _FactData(tokenizer, facts, replay=0.5, loss=loss, replay_target="text")
    assert len(data) == 20 + 10  # two statements per fact, then replay pieces
    batch = data.collate([data[i] for i in range(len(data))])
    assert "replay" not in batch
    reversed_statements = 0
    for i, (text, _, replay) in enumerate(data):
        assert replay == (i >= 20)
        labelled = tokenizer.decode(batch["input_ids"][i][batch["labels"][i] != -100])
        if i >= 20 or loss == "all":  # replay text, and every statement token with loss="all"
            assert labelled == text
            continue
        fact = facts[i // 2]
        answer_first = text.index(fact["answer"]) < text.index(fact["entity"])  # "{a} invented the {e}."
        reversed_statements += answer_first
        expected = fact["entity"] if loss == "completion" and answer_first else fact["answer"]
        assert labelled.strip() == expected, text
    assert loss == "all" or reversed_statements >= 2  # both kinds of statement were checked
    with pytest.raises(ValueError, match="statement loss"):
        _FactData(tokenizer, facts, loss="answers")


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


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer()), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_replay_trainer_loss_matches_float64_reference(tmp_path):
    """Cross-entropy on answer tokens plus KL(teacher || model) on replay rows, one mean over both kinds of token."""
    from transformers import TrainingArguments

    from engram_hf.training import EngramTrainer

    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = _FactData(tokenizer, make_facts(4), replay=0.5, replay_target="base")
    batch = data.collate([data[i] for i in range(len(data))])
    assert batch["replay"].tolist() == [False] * 8 + [True] * 4
    assert (batch["labels"][batch["replay"]] == -100).all()  # replay rows: no cross-entropy

    model, teacher = _tiny_llama(0), _tiny_llama(1)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = EngramTrainer(model=model, args=args, teacher=teacher, data_collator=data.collate)
    loss = trainer.compute_loss(model, batch)

    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        reference = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, count = 0.0, 0
    for row in range(len(data)):
        for t in range(batch["input_ids"].shape[1] - 1):
            log_q = student[row, t].log_softmax(-1)
            if batch["replay"][row] and batch["attention_mask"][row, t + 1]:
                log_p = reference[row, t].log_softmax(-1)
                total += float((log_p.exp() * (log_p - log_q)).sum())
                count += 1
            elif batch["labels"][row, t + 1] != -100:
                total -= float(log_q[batch["labels"][row, t + 1]])
                count += 1
    assert count > 8 and loss.item() == pytest.approx(total / count, rel=1e-5)

    # the teacher is the model before training: the KL part starts at zero, with (up to rounding) zero gradient
    same = EngramTrainer(model=model, args=args, teacher=_tiny_llama(0), data_collator=data.collate)
    replay_only = {k: v[batch["replay"]] for k, v in batch.items()}
    zero = same.compute_loss(model, replay_only)
    zero.backward()
    assert zero.item() == 0.0
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6


def test_replay_trainer_can_keep_tables_out_of_replay(tmp_path):
    """`replay_tables=False`: the same loss, but the replay rows' KL reaches every parameter except the tables."""
    from transformers import TrainingArguments

    from engram_hf.conversion.twin import engram_twin
    from engram_hf.training import EngramTrainer
    from engram_hf.training import empty_memory_
    from engram_hf.training.optim import engram_tables

    tokenizer = smollm2_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = _FactData(tokenizer, make_facts(4), replay=0.5, replay_target="base")
    batch = data.collate([data[i] for i in range(len(data))])
    model = empty_memory_(engram_twin(_tiny_llama(0), tokenizer, engram_layer_ids=[0, 1],
                                      engram_vocab_size=[1009, 1009]), seed=0)
    for table in engram_tables(model):
        torch.nn.init.normal_(table.weight, std=0.1)  # memory that already learned something
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    losses = {}
    for replay_tables in (True, False):
        trainer = EngramTrainer(model=model, args=args, teacher=_tiny_llama(1), data_collator=data.collate,
                                 replay_tables=replay_tables)
        losses[replay_tables] = trainer.compute_loss(model, batch).item()
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, {k: v[batch["replay"]] for k, v in batch.items()}).backward()
        table_grads = [table.weight.grad for table in engram_tables(model)]
        assert all(table.weight.requires_grad for table in engram_tables(model))  # restored after the pass
        if replay_tables:
            assert all(g is not None and g.to_dense().abs().sum() > 0 for g in table_grads)
        else:
            assert all(g is None for g in table_grads)
        others = [p.grad for n, p in model.named_parameters() if "engram.table" not in n]
        assert sum(float(g.abs().sum()) for g in others if g is not None) > 0
    assert losses[False] == pytest.approx(losses[True], rel=1e-5)
