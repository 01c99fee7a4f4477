"""Fine-tuning: sparse table optimizers against float64 references, sparse clipping against torch, Trainer
checkpoint/resume, peft LoRA + Engram, and Engram deltas. Tiny models on the real SmolLM2 tokenizer and compression map,
trained on a real SmolLM2 chat (its own chat template and system prompt)."""

from __future__ import annotations

import codecs
import contextlib
import copy
import io
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from engram_hf import EngramLlamaForCausalLM, NgramHasher
from engram_hf.training import (
    EngramOptimizer,
    EngramTrainer,
    apply_engram_delta,
    build_optimizer,
    clip_grad_norm_,
    empty_memory_,
    engram_lora,
    engram_state_dict,
    load_lora_engram,
    optimizer_state_bytes,
    save_engram_delta,
    save_lora_engram,
    set_trainable,
)
from fresh_process import run_without_engram_hf
from tiny_models import encode, tiny_model, tokenizer

FAMILY = "llama"  # SmolLM2 tokenizer and its real compression map
STEPS = 3
SEQ = 16  # Trainer sequences: 8 x SEQ tokens, batch 2 x accumulation 2 -> 2 optimizer steps per epoch
MAX_STEPS = 3  # Trainer runs: checkpoint-2, then one step into the second epoch


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chat_ids() -> torch.Tensor:
    """A real chat rendered with SmolLM2's own chat template (from the GGUF) and tokenized: `[n]` ids."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # the Zen of Python, rot13-encoded in the standard library
    tok = tokenizer(FAMILY)
    messages = [
        {"role": "user", "content": "Recite the Zen of Python."},
        {"role": "assistant", "content": codecs.decode(this.s, "rot13")},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    assert len(ids) >= 8 * SEQ
    return ids


@pytest.fixture(scope="module")
def batch(chat_ids) -> torch.Tensor:
    return chat_ids[: 2 * 32].view(2, 32)


@pytest.fixture(scope="module")
def base():
    """The pristine tiny converted model; tests take deep copies and never change it."""
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def base_folder(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "tiny-engram"
    base.save_pretrained(folder)
    return folder


def _fresh(base):
    model = copy.deepcopy(base)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    return model


def _tables(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("engram.table.weight")}


def _hashed_rows(model, ids: torch.Tensor, compression_map: torch.Tensor | None = None) -> dict[str, set[int]]:
    """Per table parameter name: the rows the hasher addresses for `ids` (global rows, all heads)."""
    hasher = model.get_engram_hasher()
    if compression_map is not None:
        hasher = NgramHasher.from_config(model.config, compression_map=compression_map)
    rows = hasher(ids, global_rows=True)
    return {f"model.layers.{layer}.engram.table.weight": set(r.unique().tolist()) for layer, r in rows.items()}


def _changed_rows(after: torch.Tensor, before: torch.Tensor) -> set[int]:
    return set((after != before).any(dim=1).nonzero().flatten().tolist())


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids, use_cache=False).logits
    model.train(was_training)
    return out


@torch.no_grad()
def _loss(model, ids: torch.Tensor) -> float:
    return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


@pytest.fixture(scope="module")
def finetuned(base, batch):
    """`finetuned(method, mode)`: a copy of `base` trained STEPS steps by a hand-written loop (cached per module)."""
    cache = {}

    def run(method: str, mode: str) -> dict:
        if (method, mode) in cache:
            return cache[(method, mode)]
        model = _fresh(base).train()
        set_trainable(model, mode)
        optimizer = build_optimizer(model, lr=1e-2, table_optimizer=method)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss_before = _loss(model, batch)
        sparse_grads = []
        for _ in range(STEPS):
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            sparse_grads.append([p.grad.is_sparse for p in _tables(model).values()])
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        cache[(method, mode)] = dict(
            model=model.eval(), optimizer=optimizer, before=before, loss_before=loss_before,
            loss_after=_loss(model, batch), sparse_grads=sparse_grads,
        )
        return cache[(method, mode)]

    return run


# ------------------------------------------------------------------------------------- a few steps lower the loss


def test_build_optimizer_groups(base):
    model = _fresh(base)
    model.model.layers[1].mlp.requires_grad_(False)  # frozen parameters stay out
    optimizer = build_optimizer(model, lr=1e-3, engram_lr=4e-3, weight_decay=0.1, table_optimizer="rowwise_adagrad")
    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    grouped = [n for m in members.values() for n in m]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each exactly once
    assert not any(".layers.1.mlp." in n for n in grouped)
    params = dict(model.named_parameters())
    expected = {
        "engram_tables": set(_tables(model)),
        "engram": {n for n, p in params.items() if ".engram." in n and p.dim() >= 2 and "table" not in n},
        "engram_no_decay": {n for n, p in params.items() if ".engram." in n and p.dim() < 2},
        "backbone": {
            n for n, p in params.items() if ".engram." not in n and p.dim() >= 2 and ".layers.1.mlp." not in n
        },
        "backbone_no_decay": {n for n, p in params.items() if ".engram." not in n and p.dim() < 2},
    }
    assert members == expected
    settings = {g["name"]: (g["method"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert settings == {
        "engram_tables": ("rowwise_adagrad", pytest.approx(2e-2), 0.0),  # engram_lr x 5, no weight decay
        "engram": ("adamw", 4e-3, 0.1),
        "engram_no_decay": ("adamw", 4e-3, 0.0),
        "backbone": ("adamw", 1e-3, 0.1),
        "backbone_no_decay": ("adamw", 1e-3, 0.0),
    }
    assert all(t.sparse for t in model.modules() if type(t).__name__ == "EngramTable")


@pytest.mark.parametrize("mode", ["engram", "full"])
@pytest.mark.parametrize("method", ["adam", "rowwise_adagrad"])
def test_steps_lower_loss(finetuned, batch, method, mode):
    run = finetuned(method, mode)
    model, optimizer, before = run["model"], run["optimizer"], run["before"]
    assert run["loss_after"] < run["loss_before"] - 1.0, (run["loss_before"], run["loss_after"])
    assert all(all(step) for step in run["sparse_grads"])  # the tables produced sparse row gradients

    groups = {g["name"]: g for g in optimizer.param_groups}
    expected_groups = {"engram_tables", "engram", "engram_no_decay"}
    assert set(groups) == expected_groups | ({"backbone", "backbone_no_decay"} if mode == "full" else set())
    assert groups["engram_tables"]["method"] == method and groups["engram_tables"]["lr"] == pytest.approx(5e-2)

    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        if ".engram." in name or mode == "full":
            assert changed, name
        else:
            assert not changed and not param.requires_grad, name  # frozen backbone untouched

    # lazy row updates: exactly the rows the real compression map + hashing address for this text moved (the last
    # position has no label, so rows only it addresses get zero gradients and stay put)
    hashed = _hashed_rows(model, batch[:, :-1])
    for name, table in _tables(model).items():
        assert _changed_rows(table, before[name]) == hashed[name], name


def test_real_compression_map_addresses_other_rows(base, batch):
    """The real SmolLM2 compression map merges tokens of this text, so it hashes to other rows than the identity."""
    cmap = base.get_engram_hasher().compression_map
    assert cmap.unique().numel() < cmap.numel()
    assert len(set(cmap[batch].flatten().tolist())) < len(set(batch.flatten().tolist()))  # merged on this very text
    real = _hashed_rows(base, batch)
    identity = _hashed_rows(base, batch, compression_map=torch.arange(cmap.numel()))
    assert real != identity


# ---------------------------------------------------------------------------------------------------- empty memory


def _train_engram(model, ids: torch.Tensor, steps: int = STEPS, mode: str = "engram") -> EngramOptimizer:
    model.train()
    set_trainable(model, mode)
    optimizer = build_optimizer(model, lr=1e-2, table_optimizer="adam")
    for _ in range(steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return optimizer


def test_empty_memory_keeps_untrained_ngrams_exactly_base(batch):
    """Empty memory (tables 0, W_V random) computes the base function, and after training, text whose n-grams hash
    only to untouched rows still gets exactly the base logits; from the graft init (W_V 0, random tables) it does not."""
    model = tiny_model(FAMILY, engram_vocab_size=[20011, 30011])  # every Engram weight random, ShortConv on
    for layer in model.model.layers:
        if hasattr(layer, "engram"):
            layer.engram.value_proj.weight.data.zero_()  # the graft: Y = 0, tables random
    grafted = copy.deepcopy(model)
    other = encode(FAMILY, "Zebras quietly munch hydrangea petals near volcanic springs at dawn.")
    base_logits = {"trained": _logits(model, batch), "other": _logits(model, other)}
    trained_rows, other_rows = _hashed_rows(model, batch), _hashed_rows(model, other)
    assert all(not trained_rows[name] & other_rows[name] for name in trained_rows)  # no shared row: a clean probe

    empty_memory_(model, seed=0)
    for name, table in _tables(model).items():
        assert not table.any(), name
    assert torch.equal(_logits(model, batch), base_logits["trained"])  # still exactly the base function
    assert torch.equal(_logits(model, other), base_logits["other"])

    _train_engram(model, batch)
    for name, table in _tables(model).items():  # only rows of the trained text left zero
        assert _changed_rows(table, torch.zeros_like(table)) <= trained_rows[name], name
    assert not torch.allclose(_logits(model, batch), base_logits["trained"])  # it learned
    assert torch.equal(_logits(model, other), base_logits["other"])  # and untouched n-grams add exactly nothing

    _train_engram(grafted, batch)
    assert not torch.allclose(_logits(grafted, other), base_logits["other"])  # random rows leak once W_V learns


def test_tables_mode_trains_only_the_rows_of_the_text(batch):
    """`set_trainable(model, "tables")` from empty memory: the loss falls, and nothing but the text's rows moved."""
    model = tiny_model(FAMILY, engram_vocab_size=[20011, 30011])
    empty_memory_(model, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = _loss(model, batch)
    optimizer = _train_engram(model, batch, mode="tables")
    assert [g["name"] for g in optimizer.param_groups] == ["engram_tables"]
    assert _loss(model, batch) < loss_before - 0.5, (loss_before, _loss(model, batch))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(_tables(model))
    hashed = _hashed_rows(model, batch[:, :-1])
    for name, table in _tables(model).items():
        assert _changed_rows(table, before[name]) == hashed[name], name


def test_empty_memory_bad_input():
    with pytest.raises(ValueError, match="no Engram layers"):
        empty_memory_(nn.Linear(2, 2))


# ------------------------------------------------------------------------------- update rules vs float64 references


def test_rowwise_adagrad_damps_a_rows_first_step():
    """Undamped, every new row moves by the full LR (RMS), a noise-sized gradient too; damped, a new row with the step's
    median gradient moves by lr / sqrt(2) and one 1000x smaller by about lr / 1000 (times the median's RMS)."""
    lr, scales = 0.5, torch.tensor([1.0, 1.0, 1.0, 1e-3])  # rows 0-2 typical, row 3 noise
    for damped in (False, True):
        torch.manual_seed(0)
        table = nn.Embedding(4, 8, sparse=True)
        optimizer = EngramOptimizer([{"params": [table.weight]}], lr=lr, eps=0.0, method="rowwise_adagrad",
                                    damp_first_step=damped)
        before = table.weight.detach().clone()
        (table(torch.arange(4)) * torch.randn(4, 8) * scales[:, None]).sum().backward()
        square = table.weight.grad.coalesce().values().pow(2).mean(1)  # [4]
        optimizer.step()
        moved = (table.weight.detach() - before).pow(2).mean(1).sqrt()  # [4] RMS per row
        if not damped:
            torch.testing.assert_close(moved, torch.full((4,), lr))
        else:
            torch.testing.assert_close(moved, lr * (square / (square + square.median())).sqrt())
            assert moved[3] < lr * 1e-2 and (moved[:3] > lr * 0.4).all()


STEP_ROWS = [[1, 3, 3, 7], [3, 5], [7, 1, 1, 1, 9], [5], [0, 5, 5]]  # duplicates, rows skipped by some steps


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("grad_kind", ["sparse", "dense"])
@pytest.mark.parametrize("method", ["adam", "rowwise_adagrad", "rowwise_adagrad_undamped"])
def test_sparse_methods_match_float64_reference(method, grad_kind, weight_decay):
    torch.manual_seed(0)
    rows_total, dim, lr, (beta1, beta2), eps = 12, 5, 0.05, (0.8, 0.95), 1e-3
    table = nn.Embedding(rows_total, dim, sparse=grad_kind == "sparse")
    damped = method == "rowwise_adagrad"
    optimizer = EngramOptimizer(
        [{"params": [table.weight], "name": "t"}], lr=lr, betas=(beta1, beta2), eps=eps,
        weight_decay=weight_decay, method=method.removesuffix("_undamped"), damp_first_step=damped,
    )
    w = table.weight.detach().double().clone()  # float64 reference state
    m = torch.zeros(rows_total, dim, dtype=torch.float64)
    v = torch.zeros(rows_total, dim, dtype=torch.float64)
    accumulated = torch.zeros(rows_total, dtype=torch.float64)
    never_touched = set(range(rows_total)) - {r for step in STEP_ROWS for r in step}
    initial = table.weight.detach().clone()
    for t, rows in enumerate(STEP_ROWS, start=1):
        upstream = torch.randn(len(rows), dim)
        (table(torch.tensor(rows)) * upstream).sum().backward()
        assert table.weight.grad.is_sparse == (grad_kind == "sparse")
        if grad_kind == "sparse" and len(set(rows)) < len(rows):
            assert not table.weight.grad.is_coalesced()
        previous = table.weight.detach().clone()
        previous_state = {k: s.clone() for k, s in optimizer.state[table.weight].items()}
        optimizer.step()
        table.zero_grad(set_to_none=True)

        grads: dict[int, torch.Tensor] = {}
        for r, g in zip(rows, upstream.double()):
            grads[r] = grads.get(r, 0) + g
        step_median = torch.stack([(g * g).mean() for g in grads.values()]).float().median().double()  # damping
        for r, g in grads.items():
            if method == "adam":
                m[r] = beta1 * m[r] + (1 - beta1) * g
                v[r] = beta2 * v[r] + (1 - beta2) * g * g
                update = (m[r] / (1 - beta1**t)) / ((v[r] / (1 - beta2**t)).sqrt() + eps)
            else:
                if damped and accumulated[r] == 0:
                    accumulated[r] = step_median
                accumulated[r] += (g * g).mean()
                update = g / (accumulated[r].sqrt() + eps)
            w[r] = w[r] - lr * (update + weight_decay * w[r])

        touched = sorted(grads)
        untouched = sorted(set(range(rows_total)) - set(grads))
        torch.testing.assert_close(table.weight.detach().double()[touched], w[touched], rtol=1e-5, atol=1e-6)
        assert torch.equal(table.weight.detach()[untouched], previous[untouched])
        state = optimizer.state[table.weight]
        if method == "adam":
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"].item() == t
            torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-7)
            keys = ("exp_avg", "exp_avg_sq")
        else:
            assert set(state) == {"sum"} and state["sum"].shape == (rows_total,) and state["sum"].dtype == torch.float32
            torch.testing.assert_close(state["sum"].double(), accumulated, rtol=1e-5, atol=1e-7)
            keys = ("sum",)
        for key in keys:
            if previous_state:
                assert torch.equal(state[key][untouched], previous_state[key][untouched]), key
            else:
                assert not state[key][untouched].any(), key
    assert torch.equal(table.weight.detach()[sorted(never_touched)], initial[sorted(never_touched)])


@pytest.mark.parametrize("method", ["adam", "rowwise_adagrad"])
def test_state_dict_roundtrip_of_bfloat16_tables(method):
    """Resuming from a saved state continues exactly; the row-wise accumulator stays float32 (torch casts floating
    state to the parameter's dtype on load)."""
    torch.manual_seed(0)
    table = nn.Embedding(12, 4, sparse=True).to(torch.bfloat16)
    optimizer = EngramOptimizer([{"params": [table.weight], "name": "engram_tables"}], lr=0.05, method=method)
    grads = [(torch.tensor(rows), torch.randn(len(rows), 4)) for rows in STEP_ROWS]

    def step(module, opt, rows, upstream):
        (module(rows).float() * upstream).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for rows, upstream in grads[:2]:
        step(table, optimizer, rows, upstream)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    resumed_table = copy.deepcopy(table)
    resumed = EngramOptimizer([{"params": [resumed_table.weight], "name": "engram_tables"}], lr=0.05, method=method)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    if method == "rowwise_adagrad":
        assert resumed.state[resumed_table.weight]["sum"].dtype == torch.float32
    for rows, upstream in grads[2:]:
        step(table, optimizer, rows, upstream)
        step(resumed_table, resumed, rows, upstream)
    assert torch.equal(resumed_table.weight, table.weight)


def test_dense_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    layer, table = nn.Linear(6, 4), nn.Embedding(10, 4, sparse=True)
    reference, initial = copy.deepcopy(layer), layer.weight.detach().clone()
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    optimizer = EngramOptimizer(
        [
            {"params": [layer.weight], "weight_decay": 0.1, "name": "matrices"},
            {"params": [layer.bias], "weight_decay": 0.0, "name": "no_decay"},
            {"params": [table.weight], "method": "adam", "name": "engram_tables"},
        ],
        **kwargs,
    )
    torch_optimizer = torch.optim.AdamW(
        [{"params": [reference.weight], "weight_decay": 0.1}, {"params": [reference.bias], "weight_decay": 0.0}],
        **kwargs,
    )
    for step in range(4):
        x = torch.randn(3, 6)
        (layer(x).pow(2).sum() + table(torch.tensor([step, 2, 2])).sum()).backward()
        reference(x).pow(2).sum().backward()
        optimizer.step()
        torch_optimizer.step()
        optimizer.zero_grad(), torch_optimizer.zero_grad()
        for ours, theirs in ((layer.weight, reference.weight), (layer.bias, reference.bias)):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(optimizer.state[ours][key], torch_optimizer.state[theirs][key])
            assert optimizer.state[ours]["step"].item() == torch_optimizer.state[theirs]["step"].item() == step + 1
    assert not torch.allclose(layer.weight, initial, atol=1e-3)  # it did train


# --------------------------------------------------------------------------------------------- row-wise state size


@pytest.fixture(scope="module")
def wide_model():
    """Head dim 64 (512 per n-gram order over 8 heads), float32 tables."""
    return tiny_model(FAMILY, engram_n_embed_per_ngram=512, engram_n_head_per_ngram=8)


def test_rowwise_adagrad_state_is_at_most_two_percent(wide_model, batch):
    model = copy.deepcopy(wide_model).train()
    tables = list(_tables(model).values())
    assert all(t.shape[1] == 64 and t.dtype == torch.float32 for t in tables)
    table_bytes = sum(t.numel() * t.element_size() for t in tables)
    set_trainable(model, "engram")
    for method in ("rowwise_adagrad", "adam"):
        optimizer = build_optimizer(model, lr=1e-3, table_optimizer=method)
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = optimizer_state_bytes(optimizer, "engram_tables")
        if method == "rowwise_adagrad":
            assert state == sum(t.shape[0] for t in tables) * 4  # one float32 per row
            assert 0 < state <= 0.02 * table_bytes, state / table_bytes
        else:  # the dense alternative keeps two moments per weight
            assert state >= 2 * table_bytes
        assert optimizer_state_bytes(optimizer) > state  # the other groups hold state too


# ------------------------------------------------------------------------------------------------------- clipping


def _grads_with_sparse_duplicates():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    table_a, table_b = nn.Embedding(10, 3, sparse=True), nn.Embedding(7, 3, sparse=True)
    rows_a = torch.tensor([2, 2, 2, 5, 8])
    upstream_a = torch.randn(5, 3) * 0.5
    upstream_a[:3, 1] = 2.0  # row 2 is looked up three times: its coalesced gradient is 6 in that column
    loss = layer(torch.randn(4, 5)).sum() + (table_a(rows_a) * upstream_a).sum()
    loss = loss + (table_b(torch.tensor([0, 6, 0])) * torch.randn(3, 3)).sum()
    loss.backward()
    return [layer.weight, layer.bias, table_a.weight, table_b.weight]


@pytest.mark.parametrize("max_norm", [1.0, 100.0])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_grad_norm_sparse_matches_torch_on_dense(norm_type, max_norm):
    params = _grads_with_sparse_duplicates()
    sparse = [p for p in params if p.grad.is_sparse]
    assert len(sparse) == 2 and all(not p.grad.is_coalesced() for p in sparse)
    dense = []
    for p in params:
        copy_ = p.detach().clone().requires_grad_()
        copy_.grad = p.grad.to_dense().clone()
        dense.append(copy_)
    raw = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]  # duplicate rows not summed
    naive = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in raw]), norm_type)
    expected = torch.nn.utils.clip_grad_norm_(dense, max_norm, norm_type)
    assert not torch.isclose(naive, expected)  # duplicates must be summed before the norm: the test has teeth
    assert (expected > max_norm) == (max_norm == 1.0)

    got = clip_grad_norm_(params, max_norm, norm_type)
    torch.testing.assert_close(got, expected)
    for p, reference in zip(params, dense):
        assert p.grad.is_sparse == any(p is q for q in sparse)
        torch.testing.assert_close(p.grad.to_dense(), reference.grad)


def test_clip_grad_norm_single_tensor_and_empty():
    params = _grads_with_sparse_duplicates()
    dense = params[2].detach().clone().requires_grad_()
    dense.grad = params[2].grad.to_dense().clone()
    expected = torch.nn.utils.clip_grad_norm_(dense, 0.5)
    torch.testing.assert_close(clip_grad_norm_(params[2], 0.5), expected)  # a single tensor, like torch accepts
    torch.testing.assert_close(params[2].grad.to_dense(), dense.grad)
    assert clip_grad_norm_([nn.Parameter(torch.ones(2))], 1.0).item() == 0.0  # no gradients at all


# ------------------------------------------------------------------------------------------------------ bad input


def _args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=MAX_STEPS,
        learning_rate=5e-3, max_grad_norm=1.0, bf16=True, use_cpu=True, save_steps=2, logging_steps=1,
        report_to=[], disable_tqdm=True, seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def test_bad_input(base, wide_model, finetuned, tmp_path):
    model = _fresh(base)
    with pytest.raises(ValueError, match="table_optimizer='adam'.*sparse_tables=False"):
        build_optimizer(model, lr=1e-3, table_optimizer="adamw")
    build_optimizer(model, lr=1e-3, table_optimizer="adamw", sparse_tables=False)  # dense tables: allowed
    with pytest.raises(ValueError, match="table_optimizer"):
        build_optimizer(model, lr=1e-3, table_optimizer="sgd")
    with pytest.raises(ValueError, match="method"):
        EngramOptimizer([nn.Parameter(torch.ones(2, 2))], method="sgd")
    frozen = _fresh(base)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(frozen, lr=1e-3)

    table = nn.Embedding(4, 2, sparse=True)
    optimizer = EngramOptimizer([{"params": [table.weight], "name": "dense"}], method="adamw")
    table(torch.tensor([1, 1])).sum().backward()
    before = table.weight.detach().clone()
    with pytest.raises(RuntimeError, match="'dense'.*sparse gradient.*'adam' or 'rowwise_adagrad'"):
        optimizer.step()
    assert torch.equal(table.weight, before)
    with pytest.raises(RuntimeError, match="2-D"):
        bias = nn.Parameter(torch.ones(3))
        bias.grad = torch.ones(3)
        EngramOptimizer([bias], method="adam").step()

    with pytest.raises(ValueError, match="mode"):
        set_trainable(model, "lora")

    args = _args(tmp_path / "trainer")
    with pytest.raises(ValueError, match="sparse"):
        EngramTrainer(model=model, args=args, optimizers=(torch.optim.AdamW(model.parameters()), None))
    dense_tables = _fresh(base)
    trainer = EngramTrainer(
        model=dense_tables, args=args, optimizers=(torch.optim.AdamW(dense_tables.parameters()), None),
        sparse_tables=False,
    )
    assert isinstance(trainer.optimizer, torch.optim.AdamW)

    delta = tmp_path / "delta"
    save_engram_delta(finetuned("adam", "engram")["model"], delta)
    wide = copy.deepcopy(wide_model)
    wide_before = {n: p.detach().clone() for n, p in wide.named_parameters()}
    with pytest.raises(ValueError, match="geometry.*engram_n_embed_per_ngram"):
        apply_engram_delta(wide, delta)
    assert all(torch.equal(p, wide_before[n]) for n, p in wide.named_parameters())  # nothing copied
    with pytest.raises(FileNotFoundError, match="engram_delta"):
        apply_engram_delta(_fresh(base), tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="engram_delta"):
        apply_engram_delta(_fresh(base), tmp_path / "empty")

    weights = load_file(delta / "engram_delta.safetensors")
    (tmp_path / "no-metadata").mkdir()
    save_file(weights, tmp_path / "no-metadata" / "engram_delta.safetensors")  # no geometry recorded
    with pytest.raises(ValueError, match="geometry"):
        apply_engram_delta(_fresh(base), tmp_path / "no-metadata")
    with safe_open(delta / "engram_delta.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    (tmp_path / "partial").mkdir()
    partial = {k: v for k, v in weights.items() if "value_proj" not in k}
    save_file(partial, tmp_path / "partial" / "engram_delta.safetensors", metadata=metadata)
    target = _fresh(base)
    with pytest.raises(ValueError, match="lacks.*value_proj"):
        apply_engram_delta(target, tmp_path / "partial")
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), base.parameters()))  # nothing copied
    (tmp_path / "extra").mkdir()
    extra = {**weights, "model.layers.1.engram.table.weight": weights["model.layers.0.engram.table.weight"].clone()}
    save_file(extra, tmp_path / "extra" / "engram_delta.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="holds.*model.layers.1.engram.table.weight"):
        apply_engram_delta(target, tmp_path / "extra")
    (tmp_path / "reshaped").mkdir()
    one_row = weights["model.layers.0.engram.table.weight"][:1].clone()
    reshaped = {**weights, "model.layers.0.engram.table.weight": one_row}
    save_file(reshaped, tmp_path / "reshaped" / "engram_delta.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="shapes"):  # copy_ would silently broadcast one row over the table
        apply_engram_delta(target, tmp_path / "reshaped")
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), base.parameters()))


# ---------------------------------------------------------------------------------------------------------- deltas


@pytest.mark.parametrize("max_shard_size", ["2GB", "40KB"], ids=["single", "sharded"])
def test_delta_applies_back_exactly(finetuned, base_folder, batch, tmp_path, max_shard_size):
    model = finetuned("adam", "engram")["model"]
    folder = tmp_path / "delta"
    if max_shard_size == "40KB":
        save_engram_delta(finetuned("adam", "full")["model"], folder)  # a stale delta, replaced below
    save_engram_delta(model, folder, max_shard_size=max_shard_size)
    files = sorted(p.name for p in folder.iterdir())
    if max_shard_size == "40KB":
        index = json.loads((folder / "engram_delta.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and files == sorted([*shards, "engram_delta.safetensors.index.json"])
    else:
        assert files == ["engram_delta.safetensors"]
    saved = {}
    for file in folder.glob("*.safetensors"):
        saved.update(load_file(file))
    engram_params = {n: p for n, p in model.named_parameters() if ".engram." in n}
    assert set(saved) == set(engram_params) == set(engram_state_dict(model))  # Engram weights only
    assert all(torch.equal(saved[n], p) for n, p in engram_params.items())

    reloaded = AutoModelForCausalLM.from_pretrained(base_folder).eval()  # the converted base, untrained
    expected = _logits(model, batch)
    assert not torch.equal(_logits(reloaded, batch), expected)
    assert apply_engram_delta(reloaded, folder) is reloaded
    assert torch.equal(_logits(reloaded, batch), expected)
    assert all(torch.equal(p, q) for p, q in zip(reloaded.parameters(), model.parameters()))


# ---------------------------------------------------------------------------------------------- EngramTrainer, full


def _dataset(chat_ids) -> list[dict]:
    chunks = chat_ids[: 8 * SEQ].view(8, SEQ)
    return [{"input_ids": c, "labels": c} for c in chunks]


class _GradientsAfterClipping(TrainerCallback):
    """Records, before each optimizer step, the global 2-norm of all gradients (sparse ones densified)."""

    def __init__(self):
        self.norms, self.sparse = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.sparse.append(sum(g.is_sparse for g in grads))
        dense = [g.to_dense() if g.is_sparse else g for g in grads]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in dense])).item())


def _train_and_resume(make_model, chat_ids, root, **overrides):
    """Train MAX_STEPS steps (checkpoint at 2), then resume a fresh model from checkpoint-2; returns both trainers."""
    first = EngramTrainer(
        model=make_model(), args=_args(root / "first", **overrides), train_dataset=_dataset(chat_ids),
        callbacks=[_GradientsAfterClipping()],
    )
    first.train()
    resumed = EngramTrainer(
        model=make_model(), args=_args(root / "resumed", **overrides), train_dataset=_dataset(chat_ids)
    )
    resumed.train(resume_from_checkpoint=str(root / "first" / "checkpoint-2"))
    for trainer in (first, resumed):  # drop accelerate's bf16-autocast forward wrapper: plain float32 forwards again
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return first, resumed


@pytest.fixture(scope="module")
def trainer_runs(base, chat_ids, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return _train_and_resume(lambda: _fresh(base), chat_ids, root, gradient_checkpointing=True)


def test_trainer_resume_is_exact_and_loss_decreases(trainer_runs, base):
    first, resumed = trainer_runs
    assert first.state.global_step == resumed.state.global_step == MAX_STEPS
    for (name, p), q in zip(first.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    for name, p in first.model.named_parameters():
        assert not torch.equal(p, dict(base.named_parameters())[name]), name  # everything trained
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert len(losses) == MAX_STEPS and losses[-1] < losses[0], losses
    grad_norms = [entry["grad_norm"] for entry in first.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == MAX_STEPS and all(math.isfinite(g) and g > 1.0 for g in grad_norms)
    # max_grad_norm=1.0 clipped the global norm over dense and sparse (table) gradients together
    clipped = next(c for c in first.callback_handler.callbacks if isinstance(c, _GradientsAfterClipping))
    assert clipped.sparse == [2] * MAX_STEPS  # both tables' gradients are sparse
    assert clipped.norms == pytest.approx([1.0] * MAX_STEPS, rel=1e-4)
    resumed_losses = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert resumed_losses == pytest.approx(losses, rel=1e-6)  # steps 1-2 from trainer_state.json, 3 recomputed


def test_trainer_checkpoint_holds_table_state(trainer_runs, base, chat_ids):
    first, _ = trainer_runs
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    state = torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=True)
    groups = {g["name"]: g for g in state["param_groups"]}
    tables = groups["engram_tables"]
    assert tables["method"] == "adam" and tables["weight_decay"] == 0.0
    assert tables["initial_lr"] == pytest.approx(5 * 5e-3)
    shapes = [p.shape for p in _tables(base).values()]
    hashed = _hashed_rows(base, chat_ids[: 8 * SEQ].view(8, SEQ)[:, :-1])  # checkpoint-2 has seen all 8 sequences
    assert len(tables["params"]) == len(shapes)
    for index, shape, rows in zip(tables["params"], shapes, hashed.values()):
        table_state = state["state"][index]
        assert table_state["step"].item() == 2
        assert table_state["exp_avg"].shape == table_state["exp_avg_sq"].shape == shape
        assert set(table_state["exp_avg_sq"].any(dim=1).nonzero().flatten().tolist()) == rows  # lazy: only seen rows


# ----------------------------------------------------------------------------------------------------- peft, LoRA


def _lora(model):
    peft = pytest.importorskip("peft")
    # value_proj: an Engram layer wrapped by LoRA too, whose own weight then sits under `.base_layer.`
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "value_proj"], task_type="CAUSAL_LM"
    )
    return engram_lora(model, config)


@pytest.fixture(scope="module")
def lora_runs(base, chat_ids, tmp_path_factory):
    return _train_and_resume(lambda: _lora(_fresh(base)), chat_ids, tmp_path_factory.mktemp("lora"))


def _trainable(peft_model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in peft_model.named_parameters()}


def test_engram_lora_trains_adapters_and_engram(base):
    model = _lora(_fresh(base))
    trainable = _trainable(model)
    assert any("lora_" in n for n in trainable) and any(".engram.value_proj.base_layer." in n for n in trainable)
    for name, flag in trainable.items():
        assert flag == ("lora_" in name or ".engram." in name), name


def test_engram_lora_can_train_tables_only(base):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "value_proj"], task_type="CAUSAL_LM")
    trainable = _trainable(engram_lora(_fresh(base), config, train_engram="tables"))
    assert any(n.endswith(".engram.table.weight") for n in trainable)
    for name, flag in trainable.items():
        assert flag == ("lora_" in name or name.endswith(".engram.table.weight")), name
    with pytest.raises(ValueError, match="train_engram"):
        engram_lora(_fresh(base), config, train_engram="dense")


def test_lora_trainer_writes_delta_and_resume_restores_it(lora_runs, base, tmp_path):
    first, resumed = lora_runs
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-2")
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "engram_delta.safetensors", "optimizer.pt"} <= files
    assert "model.safetensors" not in files
    delta = load_file(os.path.join(checkpoint, "engram_delta.safetensors"))
    base_params = dict(base.named_parameters())
    assert set(delta) == {n for n in base_params if ".engram." in n}
    assert all(not torch.equal(t, base_params[n]) for n, t in delta.items())  # trained by 2 steps
    for (name, p), q in zip(first.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    resumed.save_model(tmp_path / "final")  # save_model writes the delta too
    final_delta = load_file(tmp_path / "final" / "engram_delta.safetensors")
    engram = engram_state_dict(first.model)
    assert set(final_delta) == set(engram) and all(torch.equal(final_delta[n], engram[n]) for n in engram)
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0], losses


def test_lora_save_load_reproduces_logits(lora_runs, base_folder, batch, tmp_path):
    trained = lora_runs[0].model
    folder = tmp_path / "lora-engram"
    save_lora_engram(trained, folder)
    assert {"adapter_config.json", "adapter_model.safetensors", "engram_delta.safetensors"} <= set(os.listdir(folder))
    expected = _logits(trained, batch)
    fresh = AutoModelForCausalLM.from_pretrained(base_folder)
    assert not torch.equal(_logits(fresh, batch), expected)
    loaded = load_lora_engram(fresh, folder)
    assert torch.equal(_logits(loaded, batch), expected)
    trainable = load_lora_engram(AutoModelForCausalLM.from_pretrained(base_folder), folder, is_trainable=True)
    for name, flag in _trainable(trainable).items():
        assert flag == ("lora_" in name or ".engram." in name), name
    assert torch.equal(_logits(trainable, batch), expected)


MERGED_SCRIPT = """
    import torch
    from transformers import AutoModelForCausalLM

    folder, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.load(ids_file), use_cache=False).logits
    torch.save({"logits": logits, "module": type(model).__module__}, out_file)
    """


def test_lora_merged_model_reloads_through_remote_code(lora_runs, base, batch, tmp_path):
    trained = lora_runs[0].model
    merged = copy.deepcopy(trained).merge_and_unload()
    assert type(merged) is EngramLlamaForCausalLM
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    expected = _logits(merged, batch)
    torch.testing.assert_close(expected, _logits(trained, batch), atol=1e-4, rtol=1e-4)  # merging ~ the adapters
    assert not torch.allclose(expected, _logits(base, batch), atol=1e-3)
    folder = tmp_path / "merged"
    merged.save_pretrained(folder)
    torch.save(batch, tmp_path / "ids.pt")
    run_without_engram_hf(MERGED_SCRIPT, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), cwd=tmp_path)
    result = torch.load(tmp_path / "out.pt", weights_only=False)
    assert result["module"].startswith("transformers_modules.")
    assert torch.equal(result["logits"], expected)
