"""Tables larger than a shard (and than RAM): row slices load as one memory map, read only where looked up."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import engram_hf
from engram_hf.modeling.mmap_engram import TABLE_ALIGNMENT, map_rows, write_safetensors

from fresh_process import run_without_engram_hf
from tiny_bases import save_word_level_llama

# 2 layers x 2 orders x 2 heads x 100,003 rows x 64 float32 = 195 MiB of tables, in 8 MB shards
LARGE = dict(n_head_per_ngram=2, n_embed_per_ngram=128, table_rows=100_000, max_shard_size="8MB", progress=False)


@pytest.fixture(scope="module")
def large_graft(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    base = save_word_level_llama(root / "base")
    return base, root / "engram", engram_hf.graft(base, root / "engram", **LARGE)


def _file_backed(tensor: torch.Tensor, folder) -> bool:
    """Whether `tensor`'s first and last bytes lie in memory mappings of files in `folder`."""
    addresses = (tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size() - 1)
    found = [False, False]
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(value, 16) for value in fields[0].split("-"))
        for i, address in enumerate(addresses):
            if start <= address < end and len(fields) == 6 and fields[5].startswith(str(folder)):
                found[i] = True
    return all(found)


RSS_SCRIPT = """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM

    def rss_mib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

    spec = json.loads(sys.argv[1])
    import transformers.modeling_utils  # noqa: F401  (imports are not what is measured)
    before = rss_mib()
    model = AutoModelForCausalLM.from_pretrained(spec["folder"], trust_remote_code=True, **spec["kwargs"])
    with torch.no_grad():
        tokens = model.generate(torch.tensor(spec["ids"]), max_new_tokens=16, do_sample=False)
    after = rss_mib()
    tables = {n: m.weight for n, m in model.named_modules() if n.endswith("engram.table")}
    table_bytes = sum(t.numel() * t.element_size() for t in tables.values())
    torch.save({"growth_mib": after - before, "table_mib": table_bytes / 2**20, "tokens": tokens}, spec["out"])
    """


@pytest.mark.parametrize("kwargs", [{}, {"device_map": "auto"}], ids=["plain", "device_map_auto"])
def test_split_tables_load_as_memory_map_with_bounded_rss(large_graft, tmp_path, kwargs):
    """Remote code, fresh process: load + generate grows RSS by far less than the tables (only looked-up rows are
    read), with the same tokens as the base model (a graft is exact)."""
    base, out, result = large_graft
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert sum(".part." in key for key in weight_map) > 20
    ids = [[5, 9, 14, 3, 27, 8]]
    spec = dict(folder=str(out), ids=ids, out=str(tmp_path / "r.pt"), kwargs=kwargs)
    run_without_engram_hf(RSS_SCRIPT, json.dumps(spec), cwd=tmp_path)
    report = torch.load(tmp_path / "r.pt")
    assert report["table_mib"] > 190
    assert report["growth_mib"] < report["table_mib"] / 4, report
    reference = AutoModelForCausalLM.from_pretrained(base).generate(
        torch.tensor(ids), max_new_tokens=16, do_sample=False
    )
    assert torch.equal(report["tokens"], reference)


def test_memory_mapped_table_is_exact_private_and_saved_split(large_graft, tmp_path):
    """The mapped table equals its stored slices; writes (training) stay private to the process; `save_pretrained`
    with a shard size below a table writes it back as aligned slices that map again, with the same values."""
    _, out, _ = large_graft
    model = engram_hf.AutoModelForCausalLM.from_pretrained(out)
    name = next(n for n, _ in model.named_modules() if n.endswith("engram.table"))
    table = model.get_submodule(name).weight
    assert _file_backed(table, out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    parts = sorted((k for k in weight_map if k.startswith(f"{name}.weight.part.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    stored = []
    for key in parts:
        with safe_open(str(out / weight_map[key]), framework="pt") as handle:
            stored.append(handle.get_tensor(key))
    stored = torch.cat(stored)
    assert torch.equal(table.detach(), stored)
    with torch.no_grad():
        table[7] += 1.0  # a training step's write: copy-on-write, the checkpoint keeps its values
    with safe_open(str(out / weight_map[parts[0]]), framework="pt") as handle:
        assert torch.equal(handle.get_tensor(parts[0])[7], stored[7])
    model.save_pretrained(tmp_path / "resaved", max_shard_size="8MB")
    resaved = engram_hf.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    again = resaved.get_submodule(name).weight
    assert _file_backed(again, tmp_path / "resaved") and torch.equal(again, table.detach())
    index = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())["weight_map"]
    assert f"{name}.weight" not in index and f"{name}.weight.part.0" in index
    assert all((tmp_path / "resaved" / f).stat().st_size <= 8 * 10**6 for f in set(index.values()))


def test_unaligned_slices_load_as_a_copy(tmp_path):
    """Slices not laid out for mapping (an offset off the page grid) are not mapped; aligned ones are."""
    table = torch.randn(3 * TABLE_ALIGNMENT // 64 + 5, 16)  # rows of 64 bytes
    step = TABLE_ALIGNMENT // 64
    for align in (True, False):
        handles = []
        for i, start in enumerate(range(0, len(table), step)):
            path = tmp_path / f"{align}-{i}.safetensors"
            rows = table[start : start + step]
            write_safetensors(path, [("t", rows.dtype, tuple(rows.shape))], [rows], align=align)
            handles.append(safe_open(str(path), framework="pt"))
        mapped = map_rows([handle.get_slice("t")[...] for handle in handles])
        assert (mapped is not None) == align
        if align:
            del handles
            assert torch.equal(mapped, table)
