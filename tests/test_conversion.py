"""Conversion (graft), placement, publish and generate: all offline, from real tokenizers and tiny/real weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import engram_hf
from engram_hf.cli import main
from engram_hf.conversion import graft as graft_module
from engram_hf.conversion.graft import load_remote_code
from engram_hf.conversion.publish import validate_folder
from engram_hf.modeling.integration_engram import transformers_device_map
from engram_hf.modeling.modeling_engram import keep_tables_on_host, plan_device_map

from realdata import qwen25_tokenizer, smollm2_gguf, smollm2_tokenizer
from fresh_process import run_without_engram_hf
from tiny_bases import save_word_level_llama

TINY = dict(n_head_per_ngram=2, n_embed_per_ngram=16, table_rows=1000, progress=False)
BIG_TABLES = dict(n_head_per_ngram=2, n_embed_per_ngram=16, table_rows=20_000, progress=False)
SPLIT_SHARD = "1MB"


def _save_tiny(folder: Path, config_class, model_class, **extra) -> Path:
    config = config_class(
        vocab_size=151936, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True, **extra,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder, max_shard_size="2MB")
    qwen25_tokenizer().save_pretrained(folder)
    return folder


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name))


def _table_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if name.endswith("engram.table")]


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", Qwen2Config, Qwen2ForCausalLM)


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", Qwen3Config, Qwen3ForCausalLM, head_dim=8)


@pytest.fixture(scope="module")
def qwen2_graft(qwen2_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("graft") / "tiny-qwen2-engram"
    result = engram_hf.graft(qwen2_base, out, max_shard_size="1MB", **TINY)
    return out, result


@pytest.fixture(scope="module")
def word_base(tmp_path_factory):
    return save_word_level_llama(tmp_path_factory.mktemp("word") / "tiny-llama")


@pytest.fixture(scope="module")
def whole_graft(word_base, tmp_path_factory):
    """~2.6 MB tables, each stored whole."""
    out = tmp_path_factory.mktemp("whole") / "tiny-llama-engram"
    return out, engram_hf.graft(word_base, out, max_shard_size="1GB", **BIG_TABLES)


@pytest.fixture(scope="module")
def split_graft(word_base, tmp_path_factory):
    """The same tables, each stored as row slices across shards of 1 MB."""
    out = tmp_path_factory.mktemp("split") / "tiny-llama-engram-split"
    return out, engram_hf.graft(word_base, out, max_shard_size=SPLIT_SHARD, **BIG_TABLES)


@pytest.fixture(scope="module")
def smollm2_graft(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Engram"
    result = engram_hf.graft(
        smollm2_gguf(), out, table_rows=4000, max_shard_size="150MB", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        progress=False,
    )
    return out, result


# ---------------------------------------------------------------------------------------------------------- graft


def test_smollm2_gguf_graft_exact_parity(smollm2_graft, capsys):
    out, result = smollm2_graft
    assert result.max_abs_diff == 0.0
    assert result.family == "llama" and result.layer_ids == [1, 15]
    assert (result.vocab_size, result.compressed_vocab_size) == (49152, 32873)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EngramLlamaForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_engram_llama.EngramLlamaForCausalLM"
    assert config["engram_compressed_vocab_size"] == 32873 and config["engram_map_size"] == 49152
    assert config["engram_vocab_size"] == [4000, 4000]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # tied, as in the base
    assert {"model.layers.1.engram.table.weight", "model.layers.15.engram.value_proj.weight",
            "model.engram_hasher.compression_map"} <= set(index["weight_map"])
    for name in ("modeling_engram.py", "modeling_engram_llama.py", "configuration_engram.py", "hashing_engram.py",
                 "layer_engram.py", "tokenizer.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "__init__.py").exists()

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0"
    assert {"engram", "custom_code"} <= set(card.data.tags)
    assert "32,873" in card.text and "49,152" in card.text and "[1, 15]" in card.text


def test_smollm2_reload_through_remote_code(smollm2_graft):
    out, _ = smollm2_graft
    model = load_remote_code(out)  # the checkpoint's own code, as without engram_hf installed
    assert type(model).__module__.startswith("transformers_modules")
    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__module__.startswith("engram_hf")
    layer = model.model.layers[1].engram
    assert torch.count_nonzero(layer.value_proj.weight) == 0
    assert torch.count_nonzero(layer.short_conv.conv.weight) == 0
    assert torch.count_nonzero(layer.table.weight) > 0

    from engram_hf import build_compression_map

    expected, _ = build_compression_map(smollm2_tokenizer())
    assert torch.equal(model.model.engram_hasher.compression_map, expected)


def test_local_qwen2_sharded_source(qwen2_base, qwen2_graft):
    out, result = qwen2_graft
    assert len(list(qwen2_base.glob("model-*.safetensors"))) > 1  # sharded source
    assert result.max_abs_diff == 0.0 and result.family == "qwen2" and result.layer_ids == [1, 2]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == result.shards
    assert all((out / s).is_file() for s in shards)
    with safe_open(str(qwen2_base / "model-00001-of-00002.safetensors"), framework="pt") as src:
        key = next(iter(src.keys()))
        with safe_open(str(out / index["weight_map"][key]), framework="pt") as dst:
            assert torch.equal(src.get_tensor(key), dst.get_tensor(key))  # copied unchanged
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "engram_qwen2" and config["engram_map_size"] == len(qwen25_tokenizer())


def test_local_qwen3_source_without_short_conv(qwen3_base, tmp_path):
    out = tmp_path / "qwen3-engram"
    result = engram_hf.graft(qwen3_base, out, layer_ids=[0, 3], short_conv=False, embed_per_head=4,
                             n_head_per_ngram=2, table_rows="0.01x", dtype="bfloat16", progress=False)
    assert result.max_abs_diff == 0.0 and result.layer_ids == [0, 3]
    config = json.loads((out / "config.json").read_text())
    assert config["engram_use_short_conv"] is False and config["engram_n_embed_per_ngram"] == 8
    assert config["engram_vocab_size"] == [int(0.01 * result.compressed_vocab_size)] * 2
    assert config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.model.layers[0].engram.short_conv is None
    assert model.model.layers[3].engram.table.weight.dtype == torch.bfloat16


def test_parameter_budget_sets_table_size(qwen2_base, tmp_path):
    result = engram_hf.graft(qwen2_base, tmp_path / "budget", layer_ids=[1], table_rows="0.1M", verify=False,
                             n_head_per_ngram=2, n_embed_per_ngram=16, progress=False)
    # 100k parameters over 1 layer x 2 orders x 2 heads x 8 dims -> 3125 rows per head
    assert result.engram_vocab_size == [3125, 3125]
    assert 100_000 <= result.table_parameters < 100_000 + 2 * 2 * 8 * 200


def test_hub_id_from_offline_cache(qwen3_base, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(qwen3_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "from-hub"
    result = engram_hf.graft("tiny-org/tiny-qwen3", out, **TINY)
    assert result.max_abs_diff == 0.0 and result.family == "qwen3"
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "README.md").data.base_model == "tiny-org/tiny-qwen3"
    with pytest.raises(ValueError, match="Could not resolve"):
        engram_hf.graft("tiny-org/not-cached", tmp_path / "nope", **TINY)
    assert not (tmp_path / "nope").exists()


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _stored_table(folder: Path, name: str) -> torch.Tensor:
    """A table as stored: the tensor `name`, or its row slices `name.part.<i>` concatenated in order."""
    weight_map = _weight_map(folder)
    parts = sorted((key for key in weight_map if key.startswith(f"{name}.part.")), key=lambda k: int(k.split(".")[-1]))
    keys = [name] if name in weight_map else parts
    tensors = []
    for key in keys:
        with safe_open(str(folder / weight_map[key]), framework="pt") as handle:
            tensors.append(handle.get_tensor(key))
    return torch.cat(tensors)


def test_big_tables_split_across_shards(whole_graft, split_graft):
    out, result = split_graft
    assert result.max_abs_diff == 0.0  # reloaded through remote code, logits equal to the base's
    weight_map, limit = _weight_map(out), graft_module.parse_size(SPLIT_SHARD)
    assert all((out / file).stat().st_size <= limit for file in result.shards)  # headers included
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    for layer in result.layer_ids:
        name = f"model.layers.{layer}.engram.table.weight"
        parts = [key for key in weight_map if key.startswith(name)]
        assert name not in weight_map and len(parts) > 2 and all(by_file[weight_map[p]] == [p] for p in parts)
        # bit-exact, and the same values as a conversion whose shards hold each table whole
        assert torch.equal(_stored_table(out, name), _stored_table(whole_graft[0], name))
    assert name in _weight_map(whole_graft[0])
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    reference = AutoModelForCausalLM.from_pretrained(whole_graft[0], trust_remote_code=True)
    for name in _table_names(model):
        assert torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight)
    model.save_pretrained(out.parent / "resaved")  # saving keeps the table whole (transformers' own sharding)
    with safe_open(str(out.parent / "resaved" / "model.safetensors"), framework="pt") as handle:
        assert {f"{name}.weight" for name in _table_names(model)} <= set(handle.keys())


SPLIT_REMOTE_SCRIPT = """
    import json
    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(sys.argv[1])
    ids, results = torch.tensor(spec["ids"]), {}
    for name, kwargs in (("default", {}), ("auto", {"device_map": "auto"})):
        model, info = AutoModelForCausalLM.from_pretrained(
            spec["folder"], trust_remote_code=True, output_loading_info=True, **kwargs
        )
        with torch.no_grad():
            logits = model(ids).logits
        tables = {n: m.weight for n, m in model.named_modules() if n.endswith("engram.table")}
        results[name] = dict(module=type(model).__module__, info={k: sorted(map(str, v)) for k, v in info.items()},
                             logits=logits, tables=tables)
    torch.save(results, spec["out"])
    """


def test_split_tables_load_through_remote_code_in_fresh_process(word_base, whole_graft, split_graft, tmp_path):
    out, result = split_graft
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]]
    spec = dict(folder=str(out), ids=ids, out=str(tmp_path / "results.pt"))
    run_without_engram_hf(SPLIT_REMOTE_SCRIPT, json.dumps(spec), cwd=tmp_path)
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(word_base)(torch.tensor(ids)).logits
    for run in results.values():
        assert run["module"].startswith("transformers_modules.")
        assert not any(run["info"].values()), run["info"]
        assert torch.equal(run["logits"], expected)
        assert sorted(run["tables"]) == [f"model.layers.{layer}.engram.table" for layer in result.layer_ids]
        for name, table in run["tables"].items():
            assert torch.equal(table, _stored_table(whole_graft[0], name + ".weight"))


# ------------------------------------------------------------------------------------------------ failure modes


def test_interrupted_conversion_leaves_nothing(qwen2_base, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(graft_module, "render_card", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        engram_hf.graft(qwen2_base, out, **TINY)
    assert _leftovers(out) == []


def test_overwrite_refusal_and_replacement(qwen2_base, tmp_path, capsys):
    cli = ["convert", str(qwen2_base), "OUT", "--layers", "2", "--heads", "2", "--embed-per-ngram", "16",
           "--table-rows", "500", "--quiet", "--no-verify"]
    out = tmp_path / "existing"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError):
        engram_hf.graft(qwen2_base, out, **TINY)
    assert main([str(out) if a == "OUT" else a for a in cli]) == 2 and "already exists" in capsys.readouterr().err
    # --overwrite replaces only a previous engram-hf output
    assert main([str(out) if a == "OUT" else a for a in cli] + ["--overwrite"]) == 2
    assert "not an engram-hf output" in capsys.readouterr().err and (out / "old.txt").read_text() == "old"
    out = tmp_path / "converted"
    engram_hf.graft(qwen2_base, out, layer_ids=[1], verify=False, **TINY)
    code = main([str(out) if a == "OUT" else a for a in cli] + ["--overwrite"])
    assert code == 0 and "V' = " in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["engram_layer_ids"] == [2]
    assert _leftovers(out) == [out.name]
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())  # readable by others, like any folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bad_inputs_write_nothing(qwen2_base, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        other = tmp_path / "gpt2"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        engram_hf.graft(other, out, **TINY)
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(qwen2_base, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    with pytest.raises(ValueError, match="tokenizer"):
        engram_hf.graft(no_tok, out, **TINY)
    with pytest.raises(ValueError, match="decoder layers"):
        engram_hf.graft(qwen2_base, out, layer_ids=[1, 4], **TINY)
    for rows in (0, -5, "0x", "-1x"):
        with pytest.raises(ValueError, match="positive"):
            engram_hf.graft(qwen2_base, out, **{**TINY, "table_rows": rows})
    truncated = tmp_path / "truncated"
    shutil.copytree(qwen2_base, truncated)
    shard = truncated / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        engram_hf.graft(truncated, out, **TINY)
    with pytest.raises(FileNotFoundError):
        engram_hf.graft(tmp_path / "does-not-exist", out, **TINY)
    assert _leftovers(out) == []


# -------------------------------------------------------------------------------------------------- placement


def test_keep_tables_on_host_rewrites_device_map(qwen2_graft):
    model = AutoModelForCausalLM.from_pretrained(qwen2_graft[0], trust_remote_code=True)
    device_map = keep_tables_on_host(model, {"": 0})
    tables = _table_names(model)
    assert tables and set(device_map.values()) == {0}
    assert not any(t == k or t.startswith(k + ".") or k == "" for t in tables for k in device_map)
    covered = {name for name, _ in model.named_parameters() if any(name.startswith(k + ".") for k in device_map)}
    assert covered == {n for n, _ in model.named_parameters()} - {t + ".weight" for t in tables}


SPLIT_MAP = {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
             "model.engram_hasher": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "cpu",
             "model.layers.3": "disk"}


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", SPLIT_MAP], ids=["single", "auto", "cpu+disk"])
@pytest.mark.parametrize("stored", ["whole", "split"])
def test_tables_stay_out_of_device_map_and_hooks(qwen2_graft, split_graft, whole_graft, stored, device_map, tmp_path):
    out = (qwen2_graft if stored == "whole" else split_graft)[0]
    reference = AutoModelForCausalLM.from_pretrained((qwen2_graft if stored == "whole" else whole_graft)[0],
                                                     trust_remote_code=True)
    kwargs = {"offload_folder": str(tmp_path / "offload")} if isinstance(device_map, dict) and "disk" in device_map.values() else {}
    given = dict(device_map) if isinstance(device_map, dict) else device_map
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map=given, **kwargs)
    assert given == device_map  # the caller's dict is not rewritten
    hf_map = getattr(model, "hf_device_map", {})
    for name in _table_names(model):
        table = model.get_submodule(name)
        assert not hasattr(table, "_hf_hook")
        assert table.weight.device.type == "cpu"
        assert not any(name == k or name.startswith(k + ".") or k == "" for k in hf_map)
    if kwargs:  # two "devices": accelerate hooks are attached to the rest of the model
        assert hasattr(model.model.layers[3], "_hf_hook") and hasattr(model.model.layers[1].mlp, "_hf_hook")
        assert "model.layers.1.mlp" in hf_map and "model.layers.3" in hf_map
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def _meta_model_and_sizes(folder: Path):
    """`folder`'s model on the meta device, and its bytes with and without the tables."""
    from transformers import AutoConfig
    from transformers.integrations.accelerate import compute_module_sizes

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    total = compute_module_sizes(model)[0][""]
    tables = sum(model.get_submodule(name).weight.nbytes for name in _table_names(model))
    return model, total, total - tables


def test_auto_device_map_leaves_tables_out_of_accelerator_budgets(split_graft):
    model, total, without_tables = _meta_model_and_sizes(split_graft[0])
    budget = {0: 2 * without_tables, "cpu": 10 * total}  # room for everything but the tables
    assert "cpu" in transformers_device_map(model, "auto", dict(budget), None, set()).values()  # counts the tables
    plan = plan_device_map(model, "auto", dict(budget))
    assert set(plan.values()) == {0}  # everything else fits on the accelerator
    tables = _table_names(model)
    assert not any(t == k or t.startswith(k + ".") or k == "" for t in tables for k in plan)
    covered = {name for name, _ in model.named_parameters() if any(name.startswith(k + ".") for k in plan)}
    assert covered == {name for name, _ in model.named_parameters()} - {t + ".weight" for t in tables}
    assert "EngramLlamaDecoderLayer" in model._no_split_modules  # Engram decoder layers are never split


def test_auto_device_map_needs_no_room_for_tables(whole_graft, split_graft):
    """A host budget with room for everything but the tables: nothing is offloaded to disk."""
    _, total, without_tables = _meta_model_and_sizes(split_graft[0])
    max_memory = {"cpu": 3 * without_tables}
    assert max_memory["cpu"] < total / 10  # the tables alone would not fit
    model = AutoModelForCausalLM.from_pretrained(split_graft[0], trust_remote_code=True, device_map="auto",
                                                 max_memory=max_memory)
    assert not hasattr(model, "hf_device_map") and all(p.device.type == "cpu" for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(whole_graft[0], trust_remote_code=True)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_model_to_keeps_tables_on_host(qwen2_graft):
    model = AutoModelForCausalLM.from_pretrained(qwen2_graft[0], trust_remote_code=True)
    model.to(torch.float64)
    table = model.model.layers[1].engram.table
    assert table.weight.dtype == torch.float64 and model.lm_head.weight.dtype == torch.float64
    model.to("meta")  # a device move: every other weight follows, the tables stay in host memory
    assert model.lm_head.weight.device.type == "meta"
    assert table.weight.device.type == "cpu" and table.weight.dtype == torch.float64
    table.keep_on_host = False
    model.to("meta")
    assert table.weight.device.type == "meta"


# ---------------------------------------------------------------------------------------------- publish, generate


def test_publish_dry_run_lists_files(qwen2_graft, capsys):
    out, _ = qwen2_graft
    files = validate_folder(out)
    assert {"config.json", "README.md", "model.safetensors.index.json", "modeling_engram_qwen2.py"} <= set(files)
    assert main(["publish", str(out), "--repo-id", "me/tiny-engram", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run" in printed and "model.safetensors.index.json" in printed and "README.md" in printed


def test_publish_calls_hf_api(qwen2_graft, monkeypatch, capsys):
    from huggingface_hub import CommitInfo, HfApi

    out, _ = qwen2_graft
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        files = {p.name for p in Path(kwargs["folder_path"]).iterdir()}
        assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= files
        return CommitInfo(commit_url="https://hf.co/me/tiny-engram/commit/abc", commit_message="m",
                          commit_description="", oid="abc", pr_url=None)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    assert main(["publish", str(out), "--repo-id", "me/tiny-engram", "--private", "--revision", "v1"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["branch"] == "v1"
    upload = calls[2][2]
    assert upload["folder_path"] == str(out) and upload["revision"] == "v1" and upload["create_pr"] is False
    assert "commit/abc" in capsys.readouterr().out
    calls.clear()
    assert main(["publish", str(out), "--repo-id", "me/tiny-engram", "--create-pr"]) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] and calls[1][2]["create_pr"] is True


def test_publish_refuses_incomplete_folders(qwen2_graft, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("must not upload"))
    broken = tmp_path / "broken"
    shutil.copytree(qwen2_graft[0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match="missing"):
        engram_hf.conversion.publish.publish(broken, "me/x")
    shutil.copy(qwen2_graft[0] / shard.name, shard)
    readme = broken / "README.md"
    readme.write_text(readme.read_text().replace("- custom_code\n", ""))
    with pytest.raises(ValueError, match="custom_code"):
        engram_hf.conversion.publish.publish(broken, "me/x", dry_run=True)
    with pytest.raises(ValueError, match="ORG/NAME"):
        engram_hf.conversion.publish.publish(qwen2_graft[0], "no-slash")


def test_generate_cli(qwen2_graft, capsys):
    out, _ = qwen2_graft
    assert main(["generate", str(out), "Hello world", "--max-new-tokens", "3", "--raw"]) == 0
    assert capsys.readouterr().out.startswith("Hello world")
    # a Hub id runs code from the Hub: only when asked
    assert main(["generate", "someone/engram-model", "Hello"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_generate_cli_chat_template_on_real_smollm2(smollm2_graft, capsys):
    """An instruct model gets its chat template (the answer, streamed), not a raw continuation of the question."""
    out, _ = smollm2_graft
    assert main(["generate", str(out), "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "Paris" in printed and "What is the capital" not in printed


@pytest.mark.parametrize("placement", ["host", "device"])
def test_table_placement_option_round_trip(qwen2_graft, tmp_path, placement):
    """`engram_table_device` given at load is kept by save/load and decides device maps and `.to(device)`."""
    model = AutoModelForCausalLM.from_pretrained(qwen2_graft[0], trust_remote_code=True, engram_table_device=placement)
    model.save_pretrained(tmp_path / "saved")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert model.config.engram_table_device == placement
    on_host = placement == "host"
    tables = _table_names(model)
    assert all(model.get_submodule(name).keep_on_host == on_host for name in tables)
    assert (keep_tables_on_host(model, {"": 0}) == {"": 0}) == (not on_host)  # a device table stays in the map
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config, trust_remote_code=True)
    plan = plan_device_map(meta, "auto", {0: 10**9, "cpu": 10**9})
    covered = [t for t in tables if any(t == k or t.startswith(k + ".") or k == "" for k in plan)]
    assert covered == ([] if on_host else tables)
    model.to("meta")  # a device move: tables follow only when placed on the device
    assert all(model.get_submodule(name).weight.device.type == ("cpu" if on_host else "meta") for name in tables)


def test_shard_size_units_are_bytes():
    assert [graft_module.parse_size(s) for s in ("500B", "500", "2KB", "1.5MB", "2GB")] == [500, 500, 2000, 1_500_000,
                                                                                         2_000_000_000]
