"""Saving, reloading, remote-code loading (folder and offline Hub cache), pipelines, load-time checks, and grafting
onto the real SmolLM2 checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM, pipeline

import engram_hf
from engram_hf import EngramLlamaConfig, EngramLlamaForCausalLM
from realdata import smollm2_gguf, smollm2_tokenizer
from fresh_process import run_without_engram_hf
from tiny_models import FAMILIES, PROMPTS, compression, encode, tiny_model, tokenizer

MODELING_DIR = Path(engram_hf.__file__).resolve().parent.parent / "modeling"
NEW_TOKENS = 8
PROMPT = PROMPTS[0]
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_id(family: str) -> str:
    return f"engram-test/tiny-{family}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family: the model, its saved folder (with tokenizer) and reference outputs computed in this process."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        tok = tokenizer(family)
        folder = root / family
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        ids = encode(family, PROMPT)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
            hidden = model.model(ids, use_cache=False).last_hidden_state
            generated = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        out[family] = dict(model=model, folder=folder, ids=ids, logits=logits, hidden=hidden, generated=generated)
    return out


# --- save / reload in process -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_has_auto_map_and_code(saved, family):
    item = saved[family]
    config = json.loads((item["folder"] / "config.json").read_text())
    model, module = item["model"], f"modeling_engram_{family}"
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_engram.{type(model.config).__name__}",
        "AutoModel": f"{module}.{type(model.model).__name__}",
        "AutoModelForCausalLM": f"{module}.{type(model).__name__}",
    }
    assert config["model_type"] == f"engram_{family}"
    assert config["engram_compressed_vocab_size"] == compression(family)[1]
    sources = sorted(p.name for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")
    assert sources and "hashing_engram.py" in sources
    for name in sources:
        assert (item["folder"] / name).read_text() == (MODELING_DIR / name).read_text(), name
    assert not (item["folder"] / "__init__.py").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_equal_logits(saved, family):
    item = saved[family]
    loaded = AutoModelForCausalLM.from_pretrained(item["folder"]).eval()
    assert type(loaded) is type(item["model"])
    assert torch.equal(loaded.get_engram_hasher().compression_map, compression(family)[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(item["ids"], use_cache=False).logits, item["logits"], atol=1e-6, rtol=0)
        generated = loaded.generate(item["ids"], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, item["generated"])
    base = AutoModel.from_pretrained(item["folder"]).eval()
    assert type(base) is type(item["model"].model)
    with torch.no_grad():
        torch.testing.assert_close(base(item["ids"]).last_hidden_state, item["hidden"], atol=1e-6, rtol=0)


# --- pipeline in process ------------------------------------------------------------------------------------------


def expected_pipeline_text(family: str, generated: torch.Tensor, prompt_len: int) -> str:
    return PROMPT + tokenizer(family).decode(generated[0, prompt_len:], skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_equals_generate(saved, family):
    item = saved[family]
    pipe = pipeline("text-generation", model=item["model"], tokenizer=tokenizer(family))
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    ids_out = pipe(PROMPT, return_tensors=True, **kwargs)[0]["generated_token_ids"]
    assert list(ids_out) == item["generated"][0].tolist()
    text = pipe(PROMPT, **kwargs)[0]["generated_text"]
    assert text == expected_pipeline_text(family, item["generated"], item["ids"].shape[1])


# --- fresh process, remote code -----------------------------------------------------------------------------------

REMOTE_SCRIPT = """
    import json
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, pipeline

    spec = json.loads(sys.argv[1])
    results = {}
    for family, item in spec.items():
        ids = torch.tensor(item["ids"])
        for source, where in (("folder", item["folder"]), ("hub", item["hub_id"])):
            lm = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True).eval()
            base = AutoModel.from_pretrained(where, trust_remote_code=True).eval()
            with torch.no_grad():
                results[f"{family}/{source}/logits"] = lm(ids, use_cache=False).logits
                results[f"{family}/{source}/hidden"] = base(ids).last_hidden_state
                results[f"{family}/{source}/generated"] = lm.generate(ids, max_new_tokens=item["new_tokens"], do_sample=False)
            results[f"{family}/{source}/modules"] = [type(lm).__module__, type(base).__module__, type(lm.config).__module__]
        pipe = pipeline("text-generation", model=item["folder"], trust_remote_code=True)
        out = pipe(item["prompt"], max_new_tokens=item["new_tokens"], do_sample=False)
        results[f"{family}/pipeline/text"] = out[0]["generated_text"]
        results[f"{family}/pipeline/modules"] = [type(pipe.model).__module__]
    results["engram_hf_loaded"] = [m for m in sys.modules if m.startswith("engram_hf") and sys.modules[m] is not None]
    torch.save(results, item["out"])
    """


@pytest.fixture(scope="module")
def remote(saved, tmp_path_factory):
    """Loads every saved model in a fresh process without `engram_hf`, from its folder and from an offline Hub cache."""
    root = tmp_path_factory.mktemp("remote")
    hub_cache = root / "hub"
    out_file = root / "results.pt"
    spec = {}
    for family, item in saved.items():
        repo = hub_cache / f"models--{hub_id(family).replace('/', '--')}"
        shutil.copytree(item["folder"], repo / "snapshots" / HUB_COMMIT)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(HUB_COMMIT)
        spec[family] = dict(
            folder=str(item["folder"]), hub_id=hub_id(family), ids=item["ids"].tolist(), prompt=PROMPT,
            new_tokens=NEW_TOKENS, out=str(out_file),
        )
    proc = run_without_engram_hf(REMOTE_SCRIPT, json.dumps(spec), cwd=root, HF_HUB_CACHE=str(hub_cache))
    return {**torch.load(out_file, weights_only=False), "stderr": proc.stderr}


@pytest.mark.parametrize("source", ["folder", "hub"])
@pytest.mark.parametrize("family", FAMILIES)
def test_remote_code_fresh_process(saved, remote, family, source):
    item = saved[family]
    assert remote["engram_hf_loaded"] == []
    for module in remote[f"{family}/{source}/modules"]:
        assert module.startswith("transformers_modules."), module
    torch.testing.assert_close(remote[f"{family}/{source}/logits"], item["logits"], atol=1e-6, rtol=0)
    torch.testing.assert_close(remote[f"{family}/{source}/hidden"], item["hidden"], atol=1e-6, rtol=0)
    assert torch.equal(remote[f"{family}/{source}/generated"], item["generated"])


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_code_pipeline_fresh_process(saved, remote, family):
    item = saved[family]
    assert remote[f"{family}/pipeline/modules"][0].startswith("transformers_modules.")
    assert remote[f"{family}/pipeline/text"] == expected_pipeline_text(family, item["generated"], item["ids"].shape[1])


DEPRECATION = re.compile(r"FutureWarning|DeprecationWarning|deprecated", re.IGNORECASE)


# transformers 5.16's own text-generation pipeline passes its generation config next to the call's keyword arguments
# and then warns about that pair; the script calls the pipeline as the README does, so the warning is not ours
PIPELINE_OWN = "Passing `generation_config` together with generation-related arguments"


def test_remote_code_prints_no_deprecation(remote):
    """Loading, forward, generate and pipeline through the remote code: no deprecation warning from our calls."""
    ours = [line for line in remote["stderr"].splitlines() if DEPRECATION.search(line) and PIPELINE_OWN not in line]
    assert not ours, remote["stderr"][-3000:]


def test_generate_command_prints_no_deprecation(saved, tmp_path):
    """`engram-hf generate` on a saved folder: the generated text, and no deprecation warning (every warning shown)."""
    item = saved["llama"]
    env = {**os.environ, "PYTHONWARNINGS": "always", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "engram_hf.cli", "generate", str(item["folder"]), PROMPT, "--raw", "--max-new-tokens",
         str(NEW_TOKENS)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == expected_pipeline_text("llama", item["generated"], item["ids"].shape[1]).strip()
    assert not DEPRECATION.search(proc.stderr), proc.stderr[-3000:]


# --- load-time checks of the stored compression map ---------------------------------------------------------------


def _copy_with_config(saved, tmp_path, family: str, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved[family]["folder"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("delta", [1, -1])
def test_config_compressed_vocab_mismatch_raises(saved, tmp_path, delta):
    family = "llama"
    v = compression(family)[1]
    folder = _copy_with_config(saved, tmp_path, family, engram_compressed_vocab_size=v + delta)
    with pytest.raises(ValueError, match="compression map"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="compression map"):
        AutoModel.from_pretrained(folder)


@pytest.mark.parametrize("delta", [1, -1])
def test_config_map_length_mismatch_raises(saved, tmp_path, delta):
    family = "qwen2"
    n = len(tokenizer(family))
    folder = _copy_with_config(saved, tmp_path, family, engram_map_size=n + delta)
    # transformers itself refuses the buffer's size mismatch
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(folder)
    # and when told to ignore it, the re-initialised (identity) map must not pass silently
    with pytest.raises(ValueError, match="compression map"):
        AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True)


def _edit_weights(saved, tmp_path, family: str, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved[family]["folder"], folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights, metadata={"format": "pt"})
    return folder


def test_missing_stored_map_raises(saved, tmp_path):
    folder = _edit_weights(saved, tmp_path, "llama", lambda state: state.pop("model.engram_hasher.compression_map"))
    with pytest.raises(ValueError, match="compression map"):
        AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="compression map"):
        AutoModel.from_pretrained(folder)


def test_stored_map_inconsistent_with_config_raises(saved, tmp_path):
    """The map stored in the weights (not the config) has fewer distinct ids than the config's V'."""

    def merge_two_ids(state):
        key = "model.engram_hasher.compression_map"
        cmap = state[key].clone()
        cmap[cmap == 7] = 3
        state[key] = cmap

    folder = _edit_weights(saved, tmp_path, "qwen3", merge_two_ids)
    with pytest.raises(ValueError, match="compression map"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "changes, message",
    [({"engram_seed": 1}, "config.json's engram_seed differ"),
     ({"engram_pad_token_id": 5}, "config.json's engram_pad_token_id differ"),
     ({"engram_layer_ids": [0, 1]}, "lacks .*model.layers.1.engram")],
)
def test_config_edit_that_changes_hashing_raises(saved, tmp_path, changes, message):
    """An edited config.json that would silently change every hash is refused by name (a moved layer: its weights)."""
    folder = _copy_with_config(saved, tmp_path, "llama", **changes)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_missing_engram_weight_raises(saved, tmp_path):
    folder = _edit_weights(saved, tmp_path, "qwen2", lambda state: state.pop("model.layers.1.engram.value_proj.weight"))
    with pytest.raises(ValueError, match="lacks .*model.layers.1.engram.value_proj.weight"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_other_table_size_with_ignore_mismatched_sizes_raises(saved, tmp_path):
    def shrink_table(state):
        key = "model.layers.2.engram.table.weight"
        state[key] = state[key][:-1].clone()

    folder = _edit_weights(saved, tmp_path, "llama", shrink_table)
    with pytest.raises(ValueError, match="model.layers.2.engram.table.weight"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, ignore_mismatched_sizes=True)


# --- grafting onto the real SmolLM2 -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_base():
    pytest.importorskip("gguf")
    gguf = smollm2_gguf()
    return LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()


def test_smollm2_graft_is_exact(smollm2_base):
    base = smollm2_base
    tok = smollm2_tokenizer()
    cmap, compressed = engram_hf.build_compression_map(tok)
    drop = {"model_type", "architectures", "quantization_config", "transformers_version", "_name_or_path", "dtype",
            "_model_name_or_path"}
    config = EngramLlamaConfig(
        **{k: v for k, v in base.config.to_dict().items() if k not in drop},
        engram_layer_ids=[1, 15],
        engram_n_embed_per_ngram=64,
        engram_n_head_per_ngram=4,
        engram_vocab_size=[1009, 2003],
        engram_map_size=len(tok),
        engram_compressed_vocab_size=compressed,
    )
    model = EngramLlamaForCausalLM(config).eval()  # default init is the graft init
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(".engram" in k or "engram_hasher" in k for k in missing), missing
    model.set_compression_map(cmap)
    for layer_id in config.engram_layer_ids:
        engram = model.model.layers[layer_id].engram
        assert not engram.value_proj.weight.any() and not engram.short_conv.conv.weight.any()
        assert engram.table.weight.std() > 0 and engram.key_proj[0].weight.std() > 0
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    assert torch.equal(got, expected), (got - expected).abs().max()
    with torch.no_grad():
        assert torch.equal(
            model.generate(ids, max_new_tokens=5, do_sample=False), base.generate(ids, max_new_tokens=5, do_sample=False)
        )
